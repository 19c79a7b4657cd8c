package treeplan

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrUnsupported wraps every refusal: the arrangement is legal but the
// plan cannot make it.
var ErrUnsupported = errors.New("not supported")

// Proc is one process of the images, zombies included.
type Proc struct {
	Pid, Ppid, Pgid, Sid int32
	ExitSignal           int32
	// FilesWith and FsWith name the process whose fd table (CLONE_FILES)
	// or filesystem information (CLONE_FS) this one shares, its parent or
	// a sibling; 0 for none.
	FilesWith, FsWith int32
	// Subreaper: the process is a child subreaper (PR_SET_CHILD_SUBREAPER);
	// Init: it is the init of its PID namespace (orphans below it go to
	// it all the same).
	Subreaper, Init bool
}

// Op is what a step does.
type Op int

const (
	// Clone: From clones Pid (From 0 is the restore's seed, for the root).
	Clone Op = iota + 1
	// Setsid: Pid makes a session.
	Setsid
	// Setpgid: Pid joins group Pgid, or makes it when Pgid is Pid.
	Setpgid
	// Exit: helper Pid exits and its parent From reaps it; its children
	// go to its nearest subreaper ancestor.
	Exit
	// Subreaper: Pid becomes a child subreaper (before a helper's exit
	// hands it an orphan).
	Subreaper
)

func (o Op) String() string {
	switch o {
	case Clone:
		return "clone"
	case Setsid:
		return "setsid"
	case Setpgid:
		return "setpgid"
	case Exit:
		return "exit"
	case Subreaper:
		return "subreaper"
	}
	return fmt.Sprintf("Op(%d)", int(o))
}

// Step is one action of the plan.
type Step struct {
	Op  Op
	Pid int32
	// From: the process that calls clone3 (Clone), or the parent that
	// reaps the helper (Exit).
	From int32
	// Flags are clone flags (CLONE_PARENT, CLONE_FILES, CLONE_FS).
	Flags uint64
	// ExitSignal: the new process's (Clone; 0 with CLONE_PARENT, which
	// takes the creator's, as clone3 requires), or the one the helper's
	// death sends its parent (Exit).
	ExitSignal int32
	Pgid       int32
	// Helper: Pid is not a process of the images but stands in for a
	// dead session or group leader, or a dead parent, until its Exit
	// step. A negative Pid is a helper with any free PID (no set_tid):
	// the steps name it by that placeholder.
	Helper bool
}

func (s Step) String() string {
	switch s.Op {
	case Clone:
		h := ""
		if s.Helper {
			h = " (helper)"
		}
		return fmt.Sprintf("%d clones %d%s flags %#x", s.From, s.Pid, h, s.Flags)
	case Setpgid:
		return fmt.Sprintf("%d setpgid %d", s.Pid, s.Pgid)
	case Exit:
		return fmt.Sprintf("helper %d exits, reaped by %d", s.Pid, s.From)
	}
	return fmt.Sprintf("%d %v", s.Pid, s.Op)
}

// Plan is the result of Make.
type Plan struct {
	Steps []Step
	// Helpers are the PIDs of the helper processes, which must be free
	// on the target as the tree's own.
	Helpers []int32
}

// state is the simulated kernel state of a made process.
type state struct {
	sid, pgid, parent, exitSignal int32
	helper                        bool
}

type planner struct {
	procs    []*Proc
	byPid    map[int32]*Proc
	children map[int32][]*Proc // by parent, in image order
	made     map[int32]*state
	// madeChildren lists each process's children as they are made,
	// helpers included.
	madeChildren map[int32][]int32
	// outerSid and outerPgid are the root's session and group when it
	// inherits them from the restoring process (-1 when it leads them).
	outerSid, outerPgid int32
	plan                Plan
	// anyPid numbers the helpers with any PID (-1, -2, ...).
	anyPid int32
	// subreapers are the processes made subreapers early.
	subreapers map[int32]bool
}

// Make plans the making of procs. procs[0] is the root; every other
// process comes after its parent. The root's parent is the restoring
// process; the root's session and group, unless it leads them, are
// inherited from there.
func Make(procs []Proc) (*Plan, error) {
	if len(procs) == 0 {
		return nil, errors.New("no processes")
	}
	p := &planner{
		byPid:        map[int32]*Proc{},
		children:     map[int32][]*Proc{},
		made:         map[int32]*state{},
		madeChildren: map[int32][]int32{},
		subreapers:   map[int32]bool{},
	}
	for i := range procs {
		x := &procs[i]
		if p.byPid[x.Pid] != nil {
			return nil, fmt.Errorf("process %d appears twice", x.Pid)
		}
		p.procs = append(p.procs, x)
		p.byPid[x.Pid] = x
		if i > 0 {
			p.children[x.Ppid] = append(p.children[x.Ppid], x)
		}
	}
	root := p.procs[0]
	p.outerSid, p.outerPgid = root.Sid, root.Pgid
	if root.Sid == root.Pid {
		p.outerSid = -1
	}
	if root.Pgid == root.Pid {
		p.outerPgid = -1
	}
	p.clone(root.Pid, 0, unix.CLONE_PARENT, 0, false)
	p.made[root.Pid].sid, p.made[root.Pid].pgid = p.outerSid, p.outerPgid
	if root.Sid == root.Pid {
		if err := p.early(root); err != nil {
			return nil, err
		}
		p.setsid(root.Pid)
	}
	for _, x := range p.procs[1:] {
		if err := p.create(x); err != nil {
			return nil, err
		}
	}
	if err := p.groups(); err != nil {
		return nil, err
	}
	for i := len(p.plan.Helpers) - 1; i >= 0; i-- {
		h := p.plan.Helpers[i]
		st := p.made[h]
		p.plan.Steps = append(p.plan.Steps, Step{Op: Exit, Pid: h, From: st.parent, ExitSignal: st.exitSignal, Helper: true})
		for _, x := range p.procs {
			if s := p.made[x.Pid]; s != nil && s.parent == h {
				s.parent = x.Ppid // the orphan goes to its subreaper (orphanage)
			}
		}
	}
	// Only helpers with the images' PIDs need those PIDs free.
	var fixed []int32
	for _, h := range p.plan.Helpers {
		if h > 0 {
			fixed = append(fixed, h)
		}
	}
	p.plan.Helpers = fixed
	return &p.plan, nil
}

// clone records that from clones pid with flags.
func (p *planner) clone(pid, from int32, flags uint64, exitSignal int32, helper bool) {
	st := &state{parent: from, exitSignal: exitSignal, helper: helper}
	if f := p.made[from]; f != nil {
		st.sid, st.pgid = f.sid, f.pgid
		if flags&unix.CLONE_PARENT != 0 {
			st.parent, st.exitSignal = f.parent, f.exitSignal
		}
	}
	if flags&unix.CLONE_PARENT != 0 {
		exitSignal = 0
	}
	p.made[pid] = st
	p.madeChildren[st.parent] = append(p.madeChildren[st.parent], pid)
	p.plan.Steps = append(p.plan.Steps, Step{Op: Clone, Pid: pid, From: from, Flags: flags, ExitSignal: exitSignal, Helper: helper})
	if helper {
		p.plan.Helpers = append(p.plan.Helpers, pid)
	}
}

func (p *planner) setsid(pid int32) {
	p.made[pid].sid, p.made[pid].pgid = pid, pid
	p.plan.Steps = append(p.plan.Steps, Step{Op: Setsid, Pid: pid})
}

func (p *planner) setpgid(pid, pgid int32) {
	p.made[pid].pgid = pgid
	p.plan.Steps = append(p.plan.Steps, Step{Op: Setpgid, Pid: pid, Pgid: pgid})
}

// create makes x (a session leader with the children that need the
// session it then leaves).
func (p *planner) create(x *Proc) error {
	if p.made[x.Pid] != nil {
		return nil
	}
	if p.made[x.Ppid] == nil {
		return fmt.Errorf("process %d: its parent %d is not made before it", x.Pid, x.Ppid)
	}
	from, flags, err := p.maker(x)
	if err != nil {
		return err
	}
	if flags&unix.CLONE_PARENT != 0 && p.made[from].exitSignal != x.ExitSignal {
		return fmt.Errorf("process %d (exit signal %d) must be cloned by %d, whose exit signal is %d: %w",
			x.Pid, x.ExitSignal, from, p.made[from].exitSignal, ErrUnsupported)
	}
	p.clone(x.Pid, from, flags, x.ExitSignal, false)
	if x.Sid == x.Pid {
		if err := p.early(x); err != nil {
			return err
		}
		p.setsid(x.Pid)
	}
	return nil
}

// maker chooses the process that clones x: its parent, or (with
// CLONE_PARENT) a sibling it shares tables with or whose session it is
// in, or a helper that makes the session of a dead leader.
func (p *planner) maker(x *Proc) (int32, uint64, error) {
	par := x.Ppid
	if x.FilesWith != 0 || x.FsWith != 0 {
		sharer, what := x.FilesWith, "fd table"
		if sharer == 0 {
			sharer, what = x.FsWith, "filesystem information"
		}
		if x.FilesWith != 0 && x.FsWith != 0 && x.FilesWith != x.FsWith {
			return 0, 0, fmt.Errorf("process %d shares its fd table with %d and its filesystem information with %d: %w",
				x.Pid, x.FilesWith, x.FsWith, ErrUnsupported)
		}
		var flags uint64
		if x.FilesWith != 0 {
			flags |= unix.CLONE_FILES
		}
		if x.FsWith != 0 {
			flags |= unix.CLONE_FS
		}
		if sharer != par {
			s := p.byPid[sharer]
			if s == nil || s.Ppid != par || s.Pid == p.procs[0].Pid {
				return 0, 0, fmt.Errorf("process %d shares its %s with %d, neither its parent nor a sibling: %w",
					x.Pid, what, sharer, ErrUnsupported)
			}
			if err := p.create(s); err != nil {
				return 0, 0, err
			}
			flags |= unix.CLONE_PARENT
		}
		if x.Sid != x.Pid && p.made[sharer].sid != x.Sid {
			return 0, 0, fmt.Errorf("process %d shares its %s with %d, which is in another session: %w",
				x.Pid, what, sharer, ErrUnsupported)
		}
		return sharer, flags, nil
	}
	if x.Sid == x.Pid || p.made[par].sid == x.Sid {
		return par, 0, nil
	}
	for _, c := range p.madeChildren[par] {
		if p.made[c].sid == x.Sid {
			return c, unix.CLONE_PARENT, nil
		}
	}
	if p.byPid[x.Sid] != nil || x.Sid == p.outerSid {
		// An orphan its subreaper parent took in: a helper (any PID)
		// forked by a process of that session below the parent forks
		// it, then exits, and it goes to the parent as it once did.
		y, err := p.orphanage(x)
		if err != nil {
			return 0, 0, err
		}
		if y != 0 {
			if !p.subreapers[par] && !p.byPid[par].Init {
				p.subreapers[par] = true
				p.plan.Steps = append(p.plan.Steps, Step{Op: Subreaper, Pid: par})
			}
			p.anyPid--
			h := p.anyPid
			p.clone(h, y, 0, int32(unix.SIGCHLD), true)
			return h, 0, nil
		}
		return 0, 0, fmt.Errorf("process %d is in session %d, which its parent %d cannot give it (its parent is in session %d): %w",
			x.Pid, x.Sid, par, p.sidOf(par), ErrUnsupported)
	}
	// The session's leader is dead: a helper with its PID makes the
	// session again, and clones x as its sibling. One helper per PID: a
	// helper under another parent cannot serve this one too.
	if p.made[x.Sid] != nil {
		return 0, 0, fmt.Errorf("process %d is in session %d of a dead leader, which a helper under another parent already makes: %w",
			x.Pid, x.Sid, ErrUnsupported)
	}
	p.clone(x.Sid, par, 0, x.ExitSignal, true)
	p.setsid(x.Sid)
	return x.Sid, unix.CLONE_PARENT, nil
}

// orphanage finds, for x whose parent is a subreaper outside x's session,
// a process of x's session below that parent with no other subreaper
// between (a helper's orphan goes to the parent): a made one, else the
// session's leader, made now with its ancestors. 0: none.
func (p *planner) orphanage(x *Proc) (int32, error) {
	par := p.byPid[x.Ppid]
	if par == nil || !par.Subreaper && !par.Init {
		return 0, nil
	}
	below := func(y *Proc) bool {
		if y.Subreaper {
			return false
		}
		for a := y.Ppid; a != 0; a = p.byPid[a].Ppid {
			if a == par.Pid {
				return true
			}
			if q := p.byPid[a]; q == nil || q.Subreaper {
				return false
			}
		}
		return false
	}
	for _, y := range p.procs {
		if st := p.made[y.Pid]; st != nil && st.sid == x.Sid && !st.helper && below(y) {
			return y.Pid, nil
		}
	}
	l := p.byPid[x.Sid]
	if l == nil || !below(l) {
		return 0, nil
	}
	var chain []*Proc
	for a := l; a != nil && p.made[a.Pid] == nil; a = p.byPid[a.Ppid] {
		chain = append(chain, a)
	}
	for i := len(chain) - 1; i >= 0; i-- {
		if err := p.create(chain[i]); err != nil {
			return 0, err
		}
	}
	return l.Pid, nil
}

// sidOf is pid's session as the images have it.
func (p *planner) sidOf(pid int32) int32 {
	if x := p.byPid[pid]; x != nil {
		return x.Sid
	}
	return p.made[pid].sid
}

// early makes, before leader's setsid, the children that need the
// session leader is about to leave.
func (p *planner) early(leader *Proc) error {
	old := p.made[leader.Pid].sid
	for _, c := range p.children[leader.Pid] {
		if p.made[c.Pid] == nil && p.needs(c, old) {
			if err := p.create(c); err != nil {
				return err
			}
		}
	}
	return nil
}

// needs tells whether c, or a descendant of c made through session
// leaders only, is in session sid without leading it.
func (p *planner) needs(c *Proc, sid int32) bool {
	if c.Sid != c.Pid {
		return c.Sid == sid
	}
	for _, d := range p.children[c.Pid] {
		if p.needs(d, sid) {
			return true
		}
	}
	return false
}

// groups puts every process in its group: leaders of the images first,
// then helpers for groups whose leader is dead, then the members.
func (p *planner) groups() error {
	for _, x := range p.procs {
		if x.Pgid == x.Pid && p.made[x.Pid].pgid != x.Pid {
			p.setpgid(x.Pid, x.Pid)
		}
	}
	for _, x := range p.procs {
		st := p.made[x.Pid]
		if x.Pgid == x.Pid || st.pgid == x.Pgid {
			continue
		}
		g := x.Pgid
		switch {
		case g == p.outerPgid:
			return fmt.Errorf("process %d is in process group %d, the root's, which the restore cannot give it: %w", x.Pid, g, ErrUnsupported)
		case p.made[g] == nil:
			// The leader is dead: a helper with its PID, a child of x,
			// makes the group in x's session.
			p.clone(g, x.Pid, 0, int32(unix.SIGCHLD), true)
			p.setpgid(g, g)
		case p.made[g].pgid != g:
			return fmt.Errorf("process %d is in process group %d, but %d leads no group: %w", x.Pid, g, g, ErrUnsupported)
		}
		if p.made[g].sid != st.sid {
			return fmt.Errorf("process %d (session %d) is in process group %d of session %d: %w", x.Pid, x.Sid, g, p.sidOf(g), ErrUnsupported)
		}
		p.setpgid(x.Pid, g)
	}
	return nil
}
