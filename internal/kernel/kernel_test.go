package kernel

import (
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
)

// atLeast reports whether the running kernel is at least version v ("6.7").
func atLeast(t *testing.T, v string) bool {
	t.Helper()
	parse := func(s string) (int, int) {
		f := strings.FieldsFunc(s, func(r rune) bool { return r < '0' || r > '9' })
		if len(f) < 2 {
			t.Fatalf("version %q", s)
		}
		a, _ := strconv.Atoi(f[0])
		b, _ := strconv.Atoi(f[1])
		return a, b
	}
	ma, mi := parse(Release())
	wa, wi := parse(v)
	return ma > wa || ma == wa && mi >= wi
}

func fdCount(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestProbes(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("probes need root")
	}
	before := fdCount(t)
	p := New()
	for _, r := range p.All() {
		switch {
		case r.OK():
			t.Logf("%-20s ok", r.Name)
		case r.Name == "soft-dirty":
			// Depends on CONFIG_MEM_SOFT_DIRTY, not on the version.
			t.Logf("%-20s absent: %v", r.Name, r.Err)
		case !errors.Is(r.Err, ErrNotSupported):
			t.Errorf("%s: probe failed: %v", r.Name, r.Err)
		case atLeast(t, r.MinKernel):
			t.Errorf("%s: reported missing on %s, which should have it (since %s): %v", r.Name, Release(), r.MinKernel, r.Err)
		default:
			t.Logf("%-20s absent (needs %s): %v", r.Name, r.MinKernel, r.Err)
		}
		if r.Err != nil {
			var fe *FeatureError
			if !errors.As(r.Err, &fe) || fe.Name != r.Name || !strings.Contains(r.Err.Error(), r.MinKernel) {
				t.Errorf("%s: error does not name the feature and kernel version: %v", r.Name, r.Err)
			}
		}
	}
	if after := fdCount(t); after != before {
		t.Errorf("probes leaked fds: %d before, %d after", before, after)
	}
	t.Logf("dirty tracker: %s", p.DirtyTracker())
}

func TestCached(t *testing.T) {
	p := New()
	calls := 0
	f := Feature{Name: "x", MinKernel: "1.0", probe: func(*Probes) error { calls++; return errors.New("no") }}
	for i := 0; i < 3; i++ {
		if err := p.run(f); err == nil {
			t.Fatal("want error")
		}
	}
	if calls != 1 {
		t.Fatalf("probe ran %d times", calls)
	}
}

func TestUnknownFeature(t *testing.T) {
	if err := New().Check("no-such-thing"); !errors.Is(err, ErrUnknown) {
		t.Fatalf("got %v", err)
	}
}
