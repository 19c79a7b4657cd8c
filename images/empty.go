package images

import "google.golang.org/protobuf/types/known/emptypb"

// emptyMsg decodes any record (it has no fields, unknown ones are kept).
type emptyMsg = emptypb.Empty
