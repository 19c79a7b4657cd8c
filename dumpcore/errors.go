package dumpcore

import "errors"

var (
	// ErrNoProcess reports a PID that does not exist.
	ErrNoProcess = errors.New("no such process")
	// ErrUnsupported reports state ferry cannot checkpoint yet.
	ErrUnsupported = errors.New("unsupported")
	// ErrTimeout reports that freezing took longer than --timeout.
	ErrTimeout = errors.New("timed out freezing the tree")
)
