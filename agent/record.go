package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/ferrycr/ferry/agent/api/v1"
	"github.com/ferrycr/ferry/dumpcore"
	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/netlock"
)

// A migration's states, as Status reports them.
const (
	StateUnknown    = "unknown"
	StatePreparing  = "preparing"   // target: session open, rounds arriving
	StateRunning    = "running"     // source: pre-copy rounds, the tree runs
	StateFrozen     = "frozen"      // source: final round done, tree held by SIGSTOP
	StateRestored   = "restored"    // target: tree restored and running, not committed
	StateCommitted  = "committed"   // done: the tree lives on the target
	StateRolledBack = "rolled-back" // undone: the tree lives on the source
)

const (
	roleSource = "source"
	roleTarget = "target"
)

// record is what the state directory keeps of a migration.
type record struct {
	ID         string    `json:"id"`
	Role       string    `json:"role"`
	State      string    `json:"state"`
	Pid        int       `json:"pid,omitempty"`  // source: the tree's root
	Peer       string    `json:"peer,omitempty"` // the other side's agent
	LeaseUntil time.Time `json:"lease_until"`
	LeaseMs    uint32    `json:"lease_ms"` // the coordinator's lease
	// Procs: the source's frozen tree, or the target's restored one,
	// each named by PID and start time so that a reused PID is never
	// signalled.
	Procs []procRef `json:"procs,omitempty"`
	// Lock: target, the network lock holding the tree's connections
	// until the restore rebuilds them.
	Lock string `json:"lock,omitempty"`
	// Stopped: target, the restored tree waits for the commit, stopped.
	Stopped bool      `json:"stopped,omitempty"`
	Updated time.Time `json:"updated"`
}

type procRef struct {
	Pid   int    `json:"pid"`
	Start uint64 `json:"start"`
}

func refOf(pid int) (procRef, error) {
	st, err := proc.ReadStat(pid)
	if err != nil {
		return procRef{}, err
	}
	return procRef{Pid: pid, Start: st.StartTime}, nil
}

// signal sends sig to each process that is still the one recorded.
func signal(refs []procRef, sig unix.Signal) {
	for _, r := range refs {
		if r.alive() {
			unix.Kill(r.Pid, sig)
		}
	}
}

// alive tells whether r's process is still the one recorded.
func (r procRef) alive() bool {
	st, err := proc.ReadStat(r.Pid)
	return err == nil && st.StartTime == r.Start
}

// resumeSource resumes a source's frozen tree (root pid): the connections
// its final round held (dumpcore.Options.HoldConnections) are released
// first, and the dirty trackers of its pre-copy rounds stop watching.
func (a *Agent) resumeSource(pid int, refs []procRef) {
	if rootAlive(pid, refs) {
		if err := dumpcore.ReleaseConnections(pid); err != nil {
			a.log.Warn("migration: resuming the source", "pid", pid, "err", err)
		}
	}
	// Every process of the tree had a tracker (its main thread's PID is
	// the process's).
	for _, r := range refs {
		if r.alive() && isLeader(r.Pid) {
			a.releaseTrackers(r.Pid)
		}
	}
	signal(refs, unix.SIGCONT)
}

// isLeader tells whether tid is the main thread of its process.
func isLeader(tid int) bool {
	st, err := proc.ReadStatus(tid)
	return err == nil && st.Tgid == tid
}

// rootAlive tells whether the root pid of a recorded tree is still the
// process recorded in refs.
func rootAlive(pid int, refs []procRef) bool {
	for _, r := range refs {
		if r.Pid == pid {
			return r.alive()
		}
	}
	return false
}

// releaseTrackers has the dirty trackers of the pre-copy rounds stop
// watching pid (a rolled-back source).
func (a *Agent) releaseTrackers(pid int) {
	if err := dumpcore.ReleaseTrackers(pid); err != nil {
		a.log.Warn("migration: releasing the dirty trackers", "pid", pid, "err", err)
	}
}

// resumeTarget lets a target's restored tree, stopped until the commit,
// go on: its connections first.
func (a *Agent) resumeTarget(rec record) {
	a.unlockTarget(rec)
	signal(rec.Procs, unix.SIGCONT)
}

// unlockTarget removes the network lock a target holds its tree's
// connections with, if any.
func (a *Agent) unlockTarget(rec record) {
	if rec.Lock != "" {
		if err := netlock.Unlock(0, rec.Lock); err != nil {
			a.log.Warn("migration: removing the network lock", "table", rec.Lock, "err", err)
		}
	}
}

// killSource ends a source's frozen tree (root pid) once the target has
// it, and removes the network lock of its connections.
func (a *Agent) killSource(pid int, refs []procRef) {
	var ns *os.File
	if rootAlive(pid, refs) {
		ns, _ = netlock.OpenNS(pid)
	}
	signal(refs, unix.SIGKILL)
	if ns != nil {
		if err := netlock.UnlockIn(ns, netlock.TableName(pid)); err != nil {
			a.log.Warn("migration: removing the source's network lock", "pid", pid, "err", err)
		}
		ns.Close()
	}
}

func terminal(state string) bool { return state == StateCommitted || state == StateRolledBack }

// migration is one migration on this agent: its record and, on a target,
// the page-server session receiving its rounds.
type migration struct {
	// op serializes the long operations on a migration (rounds, restore,
	// commit, the lease's resolution).
	op sync.Mutex

	rec record // guarded by Agent.mu

	session *session  // target: the page server; source: the lazy page service
	post    *postcopy // target: the post-copy under way

	downtimeSeen bool // target: the commit's downtime is in the metrics

	// source: the round under way and the page bytes it sent so far.
	round     atomic.Int32
	roundSent atomic.Uint64

	// chains (target) holds the pre-copy rounds resolved ahead; closed
	// with the session, once the restore and its daemon are done. Guarded,
	// as release, by op.
	chains *images.ChainCache

	// release (source) closes the dirty trackers the final round kept
	// for the stopped tree (dumpcore.Result.Release): once it is killed
	// or resumed (stopSession).
	release func()
}

// stopSession ends what m runs beside its tree (call with m.op held):
// the tree is gone, or resumed.
func (m *migration) stopSession() {
	if m.session != nil {
		m.session.stop()
	}
	if m.post != nil {
		m.post.Cancel()
	}
	if m.release != nil {
		go m.release()
		m.release = nil
	}
	if cc := m.chains; cc != nil {
		m.chains = nil
		if p := m.post; p != nil {
			go func() { <-p.Done(); cc.Close() }()
		} else {
			cc.Close()
		}
	}
}

func (a *Agent) recordPath(id string) string {
	return filepath.Join(a.cfg.RunDir, "migrations", id+".json")
}

// sourceDir is where a source writes its rounds' images (the page data
// goes to the target).
func (a *Agent) sourceDir(id string) string {
	return filepath.Join(a.cfg.RunDir, "images", id)
}

func (a *Agent) imagesDir(id string) string {
	return filepath.Join(a.cfg.StateDir, "images", id)
}

// save writes m's record (atomically). Call with a.mu held.
func (a *Agent) save(m *migration) error {
	m.rec.Updated = time.Now()
	b, err := json.MarshalIndent(&m.rec, "", "  ")
	if err != nil {
		return err
	}
	p := a.recordPath(m.rec.ID)
	tmp := p + ".tmp"
	// Not synced: a record describes processes of this machine, which do
	// not outlive it, and an agent that restarts reads the page cache. An
	// fsync would wait for the journal, which after a pre-copy round holds
	// gigabytes of pages the page server just wrote: ~0.4-1 s, with the
	// tree frozen.
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

// setState records a new state (and logs it).
func (a *Agent) setState(m *migration, state string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	old := m.rec.State
	m.rec.State = state
	t0 := time.Now()
	if err := a.save(m); err != nil {
		return fmt.Errorf("recording migration %s as %s: %w", m.rec.ID, state, err)
	}
	if d := time.Since(t0); d > 20*time.Millisecond {
		// The state directory's file system is busy (a journal commit
		// taking gigabytes of pages): this is on the migration's path.
		a.log.Warn("migration: recording the state was slow", "id", m.rec.ID, "state", state, "took", d)
	}
	a.log.Info("migration: state", "id", m.rec.ID, "role", m.rec.Role, "from", old, "to", state)
	if terminal(state) {
		a.metrics.migrations.WithLabelValues(m.rec.Role, state).Inc()
	}
	return nil
}

// load reads the records left in the state directory. Those not finished
// get a fresh lease: their coordinator may still be there; if not, the
// watcher resolves them when it runs out.
func (a *Agent) load() error {
	dir := filepath.Join(a.cfg.RunDir, "migrations")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("agent: state directory: %w", err)
	}
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		p := filepath.Join(dir, e.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		m := &migration{}
		if err := json.Unmarshal(b, &m.rec); err != nil || m.rec.ID == "" {
			a.log.Warn("agent: ignoring an unreadable migration record", "file", p, "err", err)
			continue
		}
		rec := m.rec
		switch {
		case !terminal(rec.State):
			m.rec.LeaseUntil = time.Now().Add(a.lease(rec.LeaseMs))
			a.log.Info("agent: found a migration in flight", "id", rec.ID, "role", rec.Role, "state", rec.State)
		// A crash between recording an outcome and acting on it must not
		// leave a tree stopped for good: act again (both are idempotent).
		case rec.State == StateCommitted && rec.Role == roleTarget && rec.Stopped:
			a.resumeTarget(rec)
		case rec.State == StateRolledBack && rec.Role == roleSource && len(rec.Procs) > 0:
			a.resumeSource(rec.Pid, rec.Procs)
		}
		a.migs[m.rec.ID] = m
	}
	return nil
}

// get returns the migration id, or a NotFound error.
func (a *Agent) get(id string) (*migration, error) {
	if err := checkID(id); err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	m, ok := a.migs[id]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no migration %s on this node", id)
	}
	return m, nil
}

// renew extends m's lease to at least d from now (d 0: its own lease).
func (a *Agent) renew(m *migration, d time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if d == 0 {
		d = a.lease(m.rec.LeaseMs)
	}
	if t := time.Now().Add(d); t.After(m.rec.LeaseUntil) {
		m.rec.LeaseUntil = t
	}
}

// recordOf returns a copy of m's record.
func (a *Agent) recordOf(m *migration) record {
	a.mu.Lock()
	defer a.mu.Unlock()
	return m.rec
}

func (a *Agent) statusOf(m *migration) *agentv1.MigrationStatus {
	rec := a.recordOf(m)
	return &agentv1.MigrationStatus{Id: rec.ID, State: rec.State, Round: m.round.Load(), RoundBytes: m.roundSent.Load()}
}

// Status reports what this side knows of a migration.
func (a *Agent) Status(ctx context.Context, req *agentv1.MigrationRef) (*agentv1.MigrationStatus, error) {
	m, err := a.get(req.Id)
	if status.Code(err) == codes.NotFound {
		return &agentv1.MigrationStatus{Id: req.Id, State: StateUnknown}, nil
	}
	if err != nil {
		return nil, err
	}
	return a.statusOf(m), nil
}

// Renew extends the lease of a migration.
func (a *Agent) Renew(ctx context.Context, req *agentv1.RenewRequest) (*agentv1.MigrationStatus, error) {
	m, err := a.get(req.Id)
	if err != nil {
		return nil, err
	}
	a.renew(m, a.lease(req.LeaseMs))
	return a.statusOf(m), nil
}

// Finish ends a migration on this side.
func (a *Agent) Finish(ctx context.Context, req *agentv1.FinishRequest) (*agentv1.MigrationStatus, error) {
	m, err := a.get(req.Id)
	if status.Code(err) == codes.NotFound && !req.Commit {
		// Nothing here to undo.
		return &agentv1.MigrationStatus{Id: req.Id, State: StateUnknown}, nil
	}
	if err != nil {
		return nil, err
	}
	m.op.Lock()
	defer m.op.Unlock()
	if req.Commit {
		if err := a.commit(m); err != nil {
			return nil, err
		}
	} else if err := a.rollback(m); err != nil {
		return nil, err
	}
	return a.statusOf(m), nil
}

// commit ends m as done on this side. Call with m.op held.
func (a *Agent) commit(m *migration) error {
	rec := a.recordOf(m)
	switch {
	case rec.State == StateCommitted:
		return nil
	case rec.State == StateRolledBack:
		return status.Errorf(codes.FailedPrecondition, "migration %s was rolled back on this node", rec.ID)
	case rec.Role == roleTarget && rec.State != StateRestored:
		return status.Errorf(codes.FailedPrecondition, "migration %s: nothing restored to commit (state %s)", rec.ID, rec.State)
	case rec.Role == roleSource && rec.State != StateFrozen:
		return status.Errorf(codes.FailedPrecondition, "migration %s: the source tree is not frozen (state %s)", rec.ID, rec.State)
	}
	if rec.Role == roleTarget && a.cfg.Fault == "commit" {
		return status.Errorf(codes.Internal, "migration %s: commit failed (fault injected with --fault commit)", rec.ID)
	}
	if err := a.setState(m, StateCommitted); err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	switch {
	case rec.Role == roleSource:
		// The tree lives on the target now.
		a.killSource(rec.Pid, rec.Procs)
	case rec.Stopped:
		a.resumeTarget(rec)
	}
	m.stopSession()
	// In the background: removing a few GiB of images takes a while,
	// and the commit is what the tree on the target waited for.
	go a.dropImages(rec.ID)
	return nil
}

// rollback ends m as undone on this side: a target's restored tree is
// killed, a source's frozen tree resumes. Call with m.op held.
func (a *Agent) rollback(m *migration) error {
	rec := a.recordOf(m)
	switch rec.State {
	case StateRolledBack:
		return nil
	case StateCommitted:
		return status.Errorf(codes.FailedPrecondition, "migration %s is committed on this node", rec.ID)
	}
	if err := a.setState(m, StateRolledBack); err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	switch rec.Role {
	case roleTarget:
		// The copy dies without a word to its peers: the source takes
		// its connections back.
		if len(rec.Procs) > 0 && rec.Procs[0].alive() {
			if err := dumpcore.SilenceConnections(rec.Procs[0].Pid); err != nil {
				a.log.Warn("migration: rolling back", "err", err)
			}
		}
		signal(rec.Procs, unix.SIGKILL)
		a.unlockTarget(rec)
	case roleSource:
		if rec.State == StateFrozen {
			a.resumeSource(rec.Pid, rec.Procs)
			if m.release != nil {
				// Before the outcome is reported: the source runs on
				// unwatched, as before the migration.
				m.release()
				m.release = nil
			}
		} else if rec.Pid > 0 {
			// Rolled back during the pre-copy rounds: it runs on. (Only
			// ferry's trackers are touched, so a reused PID is safe.)
			a.releaseTrackers(rec.Pid)
		}
	}
	m.stopSession()
	a.dropImages(rec.ID)
	return nil
}

func (a *Agent) dropImages(id string) {
	for _, dir := range []string{a.imagesDir(id), a.sourceDir(id)} {
		if err := os.RemoveAll(dir); err != nil {
			a.log.Warn("migration: removing its images", "id", id, "err", err)
		}
	}
}

// watch resolves, every half second, the migrations whose lease ran out.
func (a *Agent) watch(ctx context.Context) {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		var due []*migration
		a.mu.Lock()
		for _, m := range a.migs {
			if !terminal(m.rec.State) && now.After(m.rec.LeaseUntil) {
				due = append(due, m)
			}
		}
		a.mu.Unlock()
		for _, m := range due {
			if !m.op.TryLock() {
				continue // an operation is under way; it renews the lease
			}
			a.expire(ctx, m)
			m.op.Unlock()
		}
	}
}

// expire resolves m, whose coordinator has not been heard from for its
// lease. A target rolls back: nothing was committed. A source asks the
// target first, and keeps a frozen tree frozen while it cannot.
func (a *Agent) expire(ctx context.Context, m *migration) {
	rec := a.recordOf(m)
	log := a.log.With("id", rec.ID, "role", rec.Role, "state", rec.State)
	if rec.Role == roleTarget || rec.State != StateFrozen {
		log.Warn("migration: lease ran out; rolling back")
		if err := a.rollback(m); err != nil {
			log.Error("migration: rollback", "err", err)
		}
		return
	}
	decided, err := a.askTarget(ctx, rec)
	if err != nil {
		// Resuming now could make the workload run twice; retry.
		a.renew(m, 5*time.Second)
		log.Error("migration: lease ran out and the target cannot say what was decided; the source tree stays frozen", "target", rec.Peer, "err", err)
		return
	}
	log.Warn("migration: lease ran out; the target says", "outcome", decided)
	if decided == StateCommitted {
		err = a.commit(m)
	} else {
		err = a.rollback(m)
	}
	if err != nil {
		log.Error("migration: resolving", "err", err)
	}
}

// askTarget learns the outcome of a migration whose source is frozen:
// "committed", or "rolled-back" once the target has undone its side.
func (a *Agent) askTarget(ctx context.Context, rec record) (string, error) {
	if rec.Peer == "" {
		return "", errors.New("no target recorded")
	}
	c, err := a.peer(rec.Peer)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := c.Status(ctx, &agentv1.MigrationRef{Id: rec.ID})
	if err != nil {
		return "", err
	}
	if st.State == StateCommitted {
		return StateCommitted, nil
	}
	// Not committed: make sure it never will be.
	st, err = c.Finish(ctx, &agentv1.FinishRequest{Id: rec.ID})
	if err != nil {
		if status.Code(err) == codes.FailedPrecondition {
			// Committed meanwhile.
			return StateCommitted, nil
		}
		return "", err
	}
	return StateRolledBack, nil
}
