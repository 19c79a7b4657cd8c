package dumpcore

import "errors"

var (
	// ErrNoProcess reports a PID that does not exist.
	ErrNoProcess = errors.New("no such process")
	// ErrUnsupported reports state ferry cannot checkpoint yet.
	ErrUnsupported = errors.New("unsupported")
	// ErrPermission reports a process the caller may not dump (not its
	// own: Options.Caller).
	ErrPermission = errors.New("permission denied")
	// ErrTimeout reports that freezing took longer than --timeout.
	ErrTimeout = errors.New("timed out freezing the tree")
)
