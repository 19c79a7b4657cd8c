package kernel

import (
	"errors"
	"fmt"
)

// ErrNotSupported is satisfied (errors.Is) by the error of a probe whose
// feature this kernel lacks.
var ErrNotSupported = errors.New("not supported by this kernel")

// ErrUnknownFeature is wrapped by errors for a feature name no probe has.
var ErrUnknownFeature = errors.New("unknown kernel feature")

// FeatureError is the error of a feature probe.
//
// errors.Is(err, ErrNotSupported) holds when the feature is absent; it does
// not when the probe failed for another reason (no permission, no probe
// child). Err is the probe's own error and keeps its errno reachable.
type FeatureError struct {
	Name      string // feature name, e.g. "uffd-wp-async"
	MinKernel string // first Linux release with the feature; "" if not tied to one
	Running   string // release of the running kernel (uname -r)
	Err       error
}

func (e *FeatureError) Error() string {
	if errors.Is(e.Err, ErrNotSupported) {
		if e.MinKernel == "" {
			return fmt.Sprintf("kernel feature %q is not available (running %s): %v", e.Name, e.Running, e.Err)
		}
		return fmt.Sprintf("kernel feature %q is not available (needs Linux %s, running %s): %v",
			e.Name, e.MinKernel, e.Running, e.Err)
	}
	return fmt.Sprintf("kernel feature %q could not be probed (running %s): %v", e.Name, e.Running, e.Err)
}

func (e *FeatureError) Unwrap() error { return e.Err }

// absentError marks a probe error as "the kernel lacks this": it matches
// ErrNotSupported and still unwraps to the errno that showed it.
type absentError struct{ err error }

func (a *absentError) Error() string   { return a.err.Error() }
func (a *absentError) Unwrap() []error { return []error{ErrNotSupported, a.err} }

// absent wraps err as proof that the feature is missing.
func absent(err error) error { return &absentError{err} }

// absentf is absent(fmt.Errorf(format, a...)).
func absentf(format string, a ...any) error { return absent(fmt.Errorf(format, a...)) }
