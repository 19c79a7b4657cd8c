package restorecore

import "errors"

var (
	// ErrValidation is wrapped by every refusal found before anything was
	// touched (PID in use, file changed, incompatible kernel or CPU).
	ErrValidation = errors.New("cannot restore")
)
