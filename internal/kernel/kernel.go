package kernel

import (
	"fmt"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Feature is one named kernel mechanism ferry relies on.
type Feature struct {
	Name        string // stable identifier, e.g. "uffd-wp-async"
	Description string // what it is and what ferry uses it for
	MinKernel   string // first mainline release that has it ("6.7"); "" if not tied to a release
	Required    bool   // needed by every plain dump and restore

	// probe exercises the mechanism. It returns a short detail on success
	// (sizes, the choice made) and, when the kernel lacks the feature, an
	// error built with absent/absentf.
	probe func(p *Probes) (detail string, err error)
}

// Result is the outcome of probing one feature.
type Result struct {
	Feature
	OK     bool
	Detail string // what the probe saw, e.g. "XSAVE area 2432 bytes"
	Err    error  // nil if OK, else a *FeatureError
}

// Probes runs feature probes, each at most once, and caches the results.
// It is safe for concurrent use. Create it with New.
type Probes struct {
	release  string    // uname -r
	version  [3]int    // release parsed, for ShouldHave
	features []Feature // in report order; fixed by New
	// cache has one entry per feature, created by New and never changed
	// afterwards; each entry's once guards its result.
	cache map[string]*cached
}

type cached struct {
	once sync.Once
	res  Result
}

// New returns a Probes for the running kernel with nothing probed yet.
func New() *Probes { return newProbes(features()) }

func newProbes(fs []Feature) *Probes {
	p := &Probes{release: release(), features: fs, cache: make(map[string]*cached, len(fs))}
	p.version, _ = parseVersion(p.release)
	for _, f := range fs {
		p.cache[f.Name] = &cached{}
	}
	return p
}

var defaultProbes = sync.OnceValue(New)

// Default returns the process-wide Probes, so that every caller shares one
// probe per feature.
func Default() *Probes { return defaultProbes() }

// Kernel returns the running kernel's release (uname -r).
func (p *Probes) Kernel() string { return p.release }

// All returns every feature, in report order.
func (p *Probes) All() []Feature { return append([]Feature(nil), p.features...) }

// Names returns every feature name, in report order.
func (p *Probes) Names() []string {
	out := make([]string, len(p.features))
	for i, f := range p.features {
		out[i] = f.Name
	}
	return out
}

// Lookup returns the feature called name.
func (p *Probes) Lookup(name string) (Feature, bool) {
	for _, f := range p.features {
		if f.Name == name {
			return f, true
		}
	}
	return Feature{}, false
}

// Check probes the feature called name (once; later calls return the cached
// result) and returns nil if the kernel has it, a *FeatureError if not, or
// an error wrapping ErrUnknownFeature.
func (p *Probes) Check(name string) error { return p.Result(name).Err }

// Result probes the feature called name (once) and returns the outcome.
func (p *Probes) Result(name string) Result {
	f, ok := p.Lookup(name)
	if !ok {
		return Result{Feature: Feature{Name: name},
			Err: fmt.Errorf("%w %q (see the names in ferry check --feature list)", ErrUnknownFeature, name)}
	}
	c := p.cache[name]
	c.once.Do(func() { c.res = p.run(f) })
	return c.res
}

// Results probes the named features, or every feature when no name is
// given, in order.
func (p *Probes) Results(names ...string) []Result {
	if len(names) == 0 {
		names = p.Names()
	}
	out := make([]Result, len(names))
	for i, n := range names {
		out[i] = p.Result(n)
	}
	return out
}

func (p *Probes) run(f Feature) Result {
	detail, err := f.probe(p)
	if err != nil {
		return Result{Feature: f, Err: &FeatureError{Name: f.Name, MinKernel: f.MinKernel, Running: p.release, Err: err}}
	}
	return Result{Feature: f, OK: true, Detail: detail}
}

// ShouldHave reports whether the running kernel is at least the release
// that introduced the feature called name: a probe saying it is missing is
// then a configuration matter or a bug, not an old kernel. Tests use it to
// fail instead of skip.
func (p *Probes) ShouldHave(name string) bool {
	f, ok := p.Lookup(name)
	if !ok || f.MinKernel == "" {
		return false
	}
	min, err := parseVersion(f.MinKernel)
	if err != nil {
		return false
	}
	return !versionLess(p.version, min)
}

func release() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// parseVersion reads the leading "a.b[.c]" of a kernel release such as
// "6.18.44-fc-v657".
func parseVersion(s string) ([3]int, error) {
	var v [3]int
	end := strings.IndexFunc(s, func(r rune) bool { return r != '.' && (r < '0' || r > '9') })
	if end >= 0 {
		s = s[:end]
	}
	parts := strings.Split(strings.TrimSuffix(s, "."), ".")
	if len(parts) < 2 || len(parts) > 3 {
		return v, fmt.Errorf("kernel version %q: want MAJOR.MINOR[.PATCH]", s)
	}
	for i, part := range parts {
		n, err := strconv.Atoi(part)
		if err != nil {
			return v, fmt.Errorf("kernel version %q: %w", s, err)
		}
		v[i] = n
	}
	return v, nil
}

func versionLess(a, b [3]int) bool {
	for i := range a {
		if a[i] != b[i] {
			return a[i] < b[i]
		}
	}
	return false
}
