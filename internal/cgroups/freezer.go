package cgroups

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Freezer is the freezer of a cgroup: freezer.state in a v1 freezer
// hierarchy, cgroup.freeze and cgroup.events in v2.
type Freezer struct {
	dir string
	v2  bool
}

// OpenFreezer returns the freezer of the cgroup at dir.
func OpenFreezer(dir string) (*Freezer, error) {
	if _, err := os.Stat(filepath.Join(dir, "freezer.state")); err == nil {
		return &Freezer{dir: dir}, nil
	}
	if _, err := os.Stat(filepath.Join(dir, "cgroup.freeze")); err == nil {
		return &Freezer{dir: dir, v2: true}, nil
	}
	return nil, fmt.Errorf("%s: not a cgroup with a freezer (no freezer.state, no cgroup.freeze)", dir)
}

// Frozen tells whether the cgroup is frozen (asked to be and done).
func (f *Freezer) Frozen() (bool, error) {
	if !f.v2 {
		b, err := os.ReadFile(filepath.Join(f.dir, "freezer.state"))
		return strings.TrimSpace(string(b)) == "FROZEN", err
	}
	b, err := os.ReadFile(filepath.Join(f.dir, "cgroup.events"))
	for _, line := range strings.Split(string(b), "\n") {
		if line == "frozen 1" {
			return true, err
		}
	}
	return false, err
}

// Set freezes (or thaws) the cgroup and waits until every task in it is
// frozen (or thawed), until deadline.
func (f *Freezer) Set(frozen bool, deadline time.Time) error {
	name, val := "freezer.state", "THAWED"
	if f.v2 {
		name, val = "cgroup.freeze", "0"
	}
	if frozen {
		val = map[bool]string{false: "FROZEN", true: "1"}[f.v2]
	}
	if err := os.WriteFile(filepath.Join(f.dir, name), []byte(val), 0); err != nil {
		return err
	}
	for delay := 100 * time.Microsecond; ; delay = min(2*delay, 10*time.Millisecond) {
		got, err := f.Frozen()
		if err != nil {
			return err
		}
		if got == frozen {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %w waiting for %s", f.dir, errTimeout, val)
		}
		time.Sleep(delay)
	}
}

var errTimeout = errors.New("timed out")
