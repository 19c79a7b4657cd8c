package images

import (
	"errors"
	"fmt"
)

// Sentinel errors; every reader error wraps one of them.
var (
	ErrBadMagic  = errors.New("not a ferry image (bad magic)")
	ErrKind      = errors.New("unexpected image kind")
	ErrVersion   = errors.New("unsupported image format version")
	ErrTruncated = errors.New("image truncated")
	ErrCorrupt   = errors.New("image corrupt")
)

// FormatError locates a problem in an image file.
type FormatError struct {
	Path   string
	Offset int64
	Msg    string
	Err    error
}

func (e *FormatError) Error() string {
	if e.Msg == "" {
		return fmt.Sprintf("images: %s: offset %d: %v", e.Path, e.Offset, e.Err)
	}
	return fmt.Sprintf("images: %s: offset %d: %s (%v)", e.Path, e.Offset, e.Msg, e.Err)
}

func (e *FormatError) Unwrap() error { return e.Err }

func formatErr(path string, off int64, err error, format string, a ...any) error {
	return &FormatError{Path: path, Offset: off, Msg: fmt.Sprintf(format, a...), Err: err}
}
