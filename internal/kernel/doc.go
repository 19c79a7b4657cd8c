// Package kernel probes the kernel mechanisms ferry relies on, once each,
// and names them: "ptrace-seize", "clone3-set-tid", "uffd-wp-async",
// "pagemap-scan", ... Each probe exercises the mechanism for real (on a
// short-lived child where it needs a tracee) and cleans up after itself.
// A missing feature is a *FeatureError that names the feature and the
// kernel version that has it and satisfies errors.Is(err, ErrNotSupported).
//
// `ferry check` prints exactly this table.
package kernel
