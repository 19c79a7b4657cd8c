package treeplan

import (
	"errors"
	"fmt"
	"testing"

	"golang.org/x/sys/unix"
)

// kernel runs a plan under the kernel's rules for clone, setsid and
// setpgid, independently of the planner's own bookkeeping.
type kernel struct {
	procs map[int32]*kproc
	// init is the init of the PID namespace, which orphans go to when no
	// subreaper takes them (0: outside).
	init int32
}

type kproc struct {
	parent, sid, pgid, exitSignal int32
	files                         *int // identity of the fd table
	helper, subreaper             bool
}

func (k *kernel) run(steps []Step) error {
	k.procs = map[int32]*kproc{}
	for _, s := range steps {
		if err := k.step(s); err != nil {
			return fmt.Errorf("step %v: %w", s, err)
		}
	}
	return nil
}

func (k *kernel) step(s Step) error {
	switch s.Op {
	case Clone:
		if k.procs[s.Pid] != nil {
			return errors.New("EEXIST")
		}
		if s.Flags&unix.CLONE_PARENT != 0 && s.ExitSignal != 0 {
			return errors.New("EINVAL: CLONE_PARENT with an exit signal")
		}
		c := &kproc{parent: s.From, exitSignal: s.ExitSignal, files: new(int), helper: s.Helper, sid: -1, pgid: -1}
		if s.From != 0 {
			f := k.procs[s.From]
			if f == nil {
				return errors.New("no such creator")
			}
			c.sid, c.pgid = f.sid, f.pgid
			if s.Flags&unix.CLONE_PARENT != 0 {
				c.parent, c.exitSignal = f.parent, f.exitSignal
			}
			if s.Flags&unix.CLONE_FILES != 0 {
				c.files = f.files
			}
		} else if s.Flags&unix.CLONE_PARENT == 0 {
			return errors.New("the root is cloned with CLONE_PARENT")
		}
		k.procs[s.Pid] = c
	case Setsid:
		for _, q := range k.procs {
			if q.pgid == s.Pid {
				return errors.New("EPERM: leads a group")
			}
		}
		k.procs[s.Pid].sid, k.procs[s.Pid].pgid = s.Pid, s.Pid
	case Setpgid:
		me := k.procs[s.Pid]
		if me.sid == s.Pid {
			return errors.New("EPERM: session leader")
		}
		if s.Pgid != s.Pid {
			found := false
			for _, q := range k.procs {
				if q.pgid == s.Pgid && q.sid == me.sid {
					found = true
				}
			}
			if !found {
				return errors.New("EPERM: no such group in the session")
			}
		}
		me.pgid = s.Pgid
	case Exit:
		h := k.procs[s.Pid]
		if h == nil || !h.helper {
			return errors.New("not a helper")
		}
		if h.parent != s.From {
			return fmt.Errorf("its parent is %d", h.parent)
		}
		// Orphans go to the nearest subreaper ancestor (or init, 0).
		reaper := h.parent
		for reaper != 0 && reaper != k.init && !k.procs[reaper].subreaper {
			reaper = k.procs[reaper].parent
		}
		for _, q := range k.procs {
			if q.parent == s.Pid {
				q.parent = reaper
			}
		}
		delete(k.procs, s.Pid)
	case Subreaper:
		k.procs[s.Pid].subreaper = true
	}
	return nil
}

func TestMake(t *testing.T) {
	const sigchld = int32(unix.SIGCHLD)
	p := func(pid, ppid, pgid, sid int32) Proc {
		return Proc{Pid: pid, Ppid: ppid, Pgid: pgid, Sid: sid, ExitSignal: sigchld}
	}
	files := func(x Proc, with int32) Proc { x.FilesWith = with; return x }
	subreaper := func(x Proc) Proc { x.Subreaper = true; return x }
	for _, tc := range []struct {
		name    string
		procs   []Proc
		helpers int
		err     string
	}{
		{name: "one", procs: []Proc{p(10, 1, 10, 10)}},
		{name: "inherits the outer session and group", procs: []Proc{p(10, 1, 5, 5), p(11, 10, 5, 5)}},
		{name: "groups", procs: []Proc{p(10, 1, 10, 10), p(11, 10, 11, 10), p(12, 11, 11, 10), p(13, 10, 11, 10)}},
		{name: "child kept the session its parent left",
			procs: []Proc{p(10, 1, 10, 10), p(11, 10, 11, 11), p(12, 11, 10, 10)}},
		{name: "session left two levels up",
			// 10 -> 11 -> 12 -> 13; 12 and then 11 made sessions; 13
			// stayed in 10's.
			procs: []Proc{p(10, 1, 10, 10), p(11, 10, 11, 11), p(12, 11, 12, 12), p(13, 12, 10, 10)}},
		{name: "orphans of a dead session leader",
			// 10 is a subreaper; 50 made a session, forked 11 and 12 and
			// died.
			procs: []Proc{p(10, 1, 10, 10), p(11, 10, 50, 50), p(12, 10, 50, 50), p(13, 12, 50, 50)}, helpers: 1},
		{name: "group of a dead leader",
			procs: []Proc{p(10, 1, 10, 10), p(11, 10, 60, 10), p(12, 10, 60, 10)}, helpers: 1},
		{name: "dead session and dead group",
			procs: []Proc{p(10, 1, 10, 10), p(11, 10, 51, 50), p(12, 10, 52, 50), p(13, 10, 50, 50)}, helpers: 3},
		{name: "sibling in the outer session",
			procs: []Proc{p(10, 1, 5, 5), p(11, 10, 11, 11), p(12, 10, 5, 5)}},
		{name: "fd table shared with a sibling",
			procs: []Proc{p(10, 1, 10, 10), p(11, 10, 10, 10), files(p(12, 10, 10, 10), 11), files(p(13, 11, 10, 10), 11)}},
		{name: "fd table shared with a cousin",
			procs: []Proc{p(10, 1, 10, 10), p(11, 10, 10, 10), p(12, 10, 10, 10), p(13, 11, 10, 10), files(p(14, 12, 10, 10), 13)},
			err:   "neither its parent nor a sibling"},
		{name: "a sibling's session",
			// 12 was orphaned into 10 (a subreaper) from 11's session.
			procs: []Proc{p(10, 1, 10, 10), p(11, 10, 11, 11), p(12, 10, 11, 11)}},
		{name: "orphan of a live session, taken in by a subreaper",
			// 10 (subreaper) -> 11 -> 12 (setsid) -> 13 -> 14; 13 died:
			// 14 went to 10, still in 12's session.
			procs:   []Proc{subreaper(p(10, 1, 10, 10)), p(11, 10, 10, 10), p(12, 11, 12, 12), p(14, 10, 12, 12)},
			helpers: 0},
		{name: "the same, the orphan listed before its session's leader",
			procs: []Proc{subreaper(p(10, 1, 10, 10)), p(11, 10, 10, 10), p(14, 10, 12, 12), p(12, 11, 12, 12)}},
		{name: "the same under the init of a PID namespace",
			procs: []Proc{{Pid: 1, Ppid: 0, Pgid: 1, Sid: 1, Init: true}, p(2, 1, 1, 1), p(4, 1, 3, 3), p(3, 2, 3, 3)}},
		{name: "one dead session under two parents",
			// 10 forked 11 and 12, each forked a child and then made a
			// session of its own; 10 (a session leader) died.
			procs: []Proc{p(1, 0, 1, 1), p(11, 1, 11, 11), p(13, 11, 10, 10), p(12, 1, 12, 12), p(14, 12, 10, 10)},
			err:   "already makes"},
		{name: "session of a live process out of reach",
			// 12 is in 13's session; neither its parent 10 nor a child
			// of 10 ever was.
			procs: []Proc{p(10, 1, 10, 10), p(11, 10, 10, 10), p(13, 11, 13, 13), p(12, 10, 13, 13)},
			err:   "which its parent 10 cannot give it"},
		{name: "group in another session",
			procs: []Proc{p(10, 1, 10, 10), p(11, 10, 11, 11), p(12, 10, 11, 10)},
			err:   "of session 11"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			plan, err := Make(tc.procs)
			if tc.err != "" {
				if err == nil || !errors.Is(err, ErrUnsupported) || !contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(plan.Helpers) != tc.helpers {
				t.Errorf("helpers %v, want %d", plan.Helpers, tc.helpers)
			}
			var k kernel
			if tc.procs[0].Init {
				k.init = tc.procs[0].Pid
			}
			if err := k.run(plan.Steps); err != nil {
				t.Fatalf("%v\nplan:\n%s", err, dump(plan))
			}
			root := tc.procs[0]
			for _, x := range tc.procs {
				q := k.procs[x.Pid]
				wantParent, wantSid, wantPgid := x.Ppid, x.Sid, x.Pgid
				if x.Pid == root.Pid {
					wantParent = 0
				}
				if x.Sid == root.Sid && root.Sid != root.Pid {
					wantSid = -1 // the restoring process's
				}
				if x.Pgid == root.Pgid && root.Pgid != root.Pid {
					wantPgid = -1
				}
				if q.parent != wantParent || q.sid != wantSid || q.pgid != wantPgid {
					t.Errorf("process %d: parent %d sid %d pgid %d, want %d %d %d\nplan:\n%s",
						x.Pid, q.parent, q.sid, q.pgid, wantParent, wantSid, wantPgid, dump(plan))
				}
				if x.FilesWith != 0 && q.files != k.procs[x.FilesWith].files {
					t.Errorf("process %d does not share its fd table with %d", x.Pid, x.FilesWith)
				}
			}
			if len(k.procs) != len(tc.procs) {
				t.Errorf("%d processes at the end, want %d", len(k.procs), len(tc.procs))
			}
		})
	}
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

func dump(p *Plan) string {
	s := ""
	for _, st := range p.Steps {
		s += "  " + st.String() + "\n"
	}
	return s
}
