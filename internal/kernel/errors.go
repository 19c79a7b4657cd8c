package kernel

import (
	"errors"
	"fmt"
)

// ErrNotSupported is wrapped by every error of a feature the running
// kernel lacks (as opposed to a probe that failed for another reason).
var ErrNotSupported = errors.New("not supported by this kernel")

// FeatureError reports a feature that is missing or could not be probed.
type FeatureError struct {
	Name      string
	MinKernel string
	Running   string
	Err       error
}

func (e *FeatureError) Error() string {
	return fmt.Sprintf("kernel feature %q is not available (needs Linux %s, running %s): %v", e.Name, e.MinKernel, e.Running, e.Err)
}

func (e *FeatureError) Unwrap() error { return e.Err }
