package images

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error a reader returns for a bad image is a
// *FormatError wrapping exactly one of them; compare with errors.Is.
var (
	// ErrBadMagic: the file does not start with "FERRYIMG".
	ErrBadMagic = errors.New("not a ferry image")
	// ErrKind: the file holds another kind of image than the caller
	// asked for, or a kind this ferry does not know.
	ErrKind = errors.New("wrong image kind")
	// ErrVersion: the file was written in a format major version this
	// ferry cannot read (a newer one), or with a feature it lacks.
	ErrVersion = errors.New("unsupported image format version")
	// ErrTruncated: the file ends in the middle of its header or a record.
	ErrTruncated = errors.New("truncated image")
	// ErrCorrupt: a checksum, a length or a record's contents are wrong.
	ErrCorrupt = errors.New("corrupt image")
)

// FormatError locates a problem in an image file:
//
//	images: /d/core-42.img: offset 1234: record checksum mismatch (corrupt image)
//
// Offset is the byte offset in the file: the start of the bad header field
// or record, or, when the file is cut short, its end. Err is one of the
// sentinel errors above, or the I/O error that stopped the read.
type FormatError struct {
	Path   string
	Offset int64
	Msg    string // what is wrong, without the path and offset
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

// readErr wraps an I/O error met at off, so that it, too, names the file
// and offset. errors.Is still sees the underlying error.
func readErr(path string, off int64, err error) error {
	return &FormatError{Path: path, Offset: off, Msg: "read failed", Err: err}
}
