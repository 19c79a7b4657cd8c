package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/ferrycr/ferry/agent/api/v1"
	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/lazypages"
	"github.com/ferrycr/ferry/pageserver"
	"github.com/ferrycr/ferry/restorecore"
	"github.com/ferrycr/ferry/transport"
)

// Prepare checks that this node can take the tree and opens the
// migration's page-server session.
func (a *Agent) Prepare(ctx context.Context, req *agentv1.PrepareRequest) (*agentv1.PrepareReply, error) {
	if err := checkID(req.Id); err != nil {
		return nil, err
	}
	if err := a.preflight(req); err != nil {
		return nil, err
	}
	a.mu.Lock()
	if _, ok := a.migs[req.Id]; ok {
		a.mu.Unlock()
		return nil, status.Errorf(codes.AlreadyExists, "migration %s already exists on %s", req.Id, a.cfg.Name)
	}
	m := &migration{rec: record{ID: req.Id, Role: roleTarget, State: StatePreparing, Peer: req.SourceAddress,
		LeaseUntil: time.Now().Add(a.lease(req.LeaseMs)), LeaseMs: req.LeaseMs}}
	a.migs[req.Id] = m
	err := a.save(m)
	a.mu.Unlock()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "recording migration %s: %v", req.Id, err)
	}
	m.op.Lock()
	defer m.op.Unlock()
	s, err := a.openSession(req.Id)
	if err != nil {
		a.rollback(m)
		return nil, status.Errorf(codes.Internal, "migration %s: page server: %v", req.Id, err)
	}
	a.mu.Lock()
	m.session = s
	a.mu.Unlock()
	return &agentv1.PrepareReply{PageAddress: s.addr}, nil
}

// preflight refuses a migration this node cannot take, naming why.
func (a *Agent) preflight(req *agentv1.PrepareRequest) error {
	for _, pid := range req.Pids {
		if st, err := proc.ReadStat(int(pid)); err == nil {
			return status.Errorf(codes.FailedPrecondition, "PID %d is taken on %s (by %s): the tree needs its PIDs", pid, a.cfg.Name, st.Comm)
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			return status.Errorf(codes.FailedPrecondition, "PID %d is taken on %s: the tree needs its PIDs", pid, a.cfg.Name)
		}
	}
	if avail := memAvailable(); avail > 0 && req.Rss > avail {
		return status.Errorf(codes.ResourceExhausted, "the tree needs %d MiB of memory and %s has %d MiB available", req.Rss>>20, a.cfg.Name, avail>>20)
	}
	if here := vdso(); req.Vdso != "" && here != "" && req.Vdso != here {
		return status.Errorf(codes.FailedPrecondition, "%s's kernel has another vDSO (%s) than the source's (%s): the restored process could not call it", a.cfg.Name, here, req.Vdso)
	}
	if missing := missingCPUFlags(req.CpuFlags, cpuFlags()); len(missing) > 0 {
		return status.Errorf(codes.FailedPrecondition, "%s's CPU lacks instruction-set features the source has: %s", a.cfg.Name, strings.Join(missing, " "))
	}
	return nil
}

// isaPrefixes name the CPU flags a program can use without the kernel
// knowing (instruction-set extensions): a tree that may have used one
// cannot move to a CPU without it.
var isaPrefixes = []string{"sse", "ssse3", "avx", "fma", "f16c", "bmi", "adx", "aes", "pclmulqdq", "vaes", "vpclmulqdq",
	"sha_ni", "gfni", "popcnt", "movbe", "rdrand", "rdseed", "lzcnt", "abm", "amx", "xsave", "clflushopt", "clwb", "erms", "fsrm"}

func missingCPUFlags(src, dst []string) []string {
	have := map[string]bool{}
	for _, f := range dst {
		have[f] = true
	}
	var missing []string
	for _, f := range src {
		if have[f] {
			continue
		}
		for _, p := range isaPrefixes {
			if strings.HasPrefix(f, p) {
				missing = append(missing, f)
				break
			}
		}
	}
	return missing
}

// session is a target's page server: the k-th stream it accepts is
// round k, stored in images/ID/k.
type session struct {
	addr   string
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once
}

func (s *session) stop() {
	s.once.Do(func() {
		s.cancel()
		<-s.done
	})
}

func (a *Agent) openSession(id string) (*session, error) {
	l, err := transport.Listen(net.JoinHostPort(a.cfg.PageHost, "0"), a.tls)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &session{addr: l.Addr().String(), cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		defer l.Close()
		for round := 1; ctx.Err() == nil; round++ {
			dir := filepath.Join(a.imagesDir(id), strconv.Itoa(round))
			if err := os.MkdirAll(dir, 0o700); err != nil {
				a.log.Error("migration: page server", "id", id, "err", err)
				return
			}
			if _, err := pageserver.Serve(ctx, pageserver.Options{Dir: dir, Listener: l, Logger: a.log.With("migration", id, "round", round)}); err != nil {
				if ctx.Err() == nil {
					a.log.Error("migration: page server", "id", id, "round", round, "err", err)
				}
				return
			}
		}
	}()
	return s, nil
}

// preparing returns the target migration id, still receiving its rounds,
// with its op lock held and its lease renewed; otherwise an error saying
// that there is, in that case, what (e.g. "nothing to restore").
func (a *Agent) preparing(id, what string) (*migration, error) {
	m, err := a.get(id)
	if err != nil {
		return nil, err
	}
	m.op.Lock()
	if st := a.statusOf(m).State; st != StatePreparing {
		m.op.Unlock()
		return nil, status.Errorf(codes.FailedPrecondition, "migration %s is %s here: %s", id, st, what)
	}
	a.renew(m, 0)
	return m, nil
}

// PutFiles stores a round's small images in the session.
func (a *Agent) PutFiles(ctx context.Context, req *agentv1.PutFilesRequest) (*agentv1.PutFilesReply, error) {
	m, err := a.preparing(req.Id, "no more images")
	if err != nil {
		return nil, err
	}
	defer m.op.Unlock()
	if err := a.storeFiles(m, req.Id, req.Round, req.Files); err != nil {
		return nil, err
	}
	return &agentv1.PutFilesReply{}, nil
}

// storeFiles stores a round's image files (those its page stream did not
// bring).
//
// Preconditions: m.op held.
func (a *Agent) storeFiles(m *migration, id string, round int32, files map[string][]byte) error {
	dir := filepath.Join(a.imagesDir(id), strconv.Itoa(int(round)))
	if round < 1 {
		return status.Errorf(codes.InvalidArgument, "round %d: rounds count from 1", round)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	for name, b := range files {
		if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
			return status.Errorf(codes.InvalidArgument, "image file name %q", name)
		}
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err == nil {
			continue // the page stream brought it
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			return status.Error(codes.Internal, err.Error())
		}
	}
	if preDumpRound(dir) {
		// A pre-copy round: its pages are resolved now, while the source
		// runs, for the final round's restore and daemon (its parent).
		// The reply waits for it, so that the next round, maybe the final
		// freeze, starts after it: resolved in the background, it took the
		// CPUs the final restore needed (40-140 ms at 4 GiB; the hybrid
		// downtime at 4 GiB went from 69 ms to 112-127 ms once the final
		// dump stopped spending that long in smaps first).
		if m.chains == nil {
			m.chains = &images.ChainCache{}
		}
		a.resolveRound(m.chains, id, dir)
	}
	if _, ok := files["inventory.img"]; ok {
		// The final round: the connections it held on the source are held
		// here too, before their address can move here (the restore
		// rebuilds them and removes the lock).
		lock, err := restorecore.LockConnections(dir)
		if err != nil {
			return status.Errorf(codes.Internal, "round %d: holding the connections: %v", round, err)
		}
		if lock != "" {
			a.mu.Lock()
			m.rec.Lock = lock
			err := a.save(m)
			a.mu.Unlock()
			if err != nil {
				return status.Errorf(codes.Internal, "recording migration %s: %v", id, err)
			}
			a.log.Info("migration: connections held until the restore", "id", id, "table", lock)
		}
	}
	return nil
}

// preDumpRound tells whether the images in dir are a pre-dump's.
func preDumpRound(dir string) bool {
	var inv pb.Inventory
	return images.ReadOne(dir, images.InventoryName, images.KindInventory, &inv) == nil && inv.PreDump
}

// resolveRound resolves the pages of a pre-copy round in dir into cc
// (failures only mean the restore resolves them itself).
func (a *Agent) resolveRound(cc *images.ChainCache, id, dir string) {
	t0 := time.Now()
	names, _ := filepath.Glob(filepath.Join(dir, "pagemap-*.img"))
	for _, n := range names {
		var pid int32
		if _, err := fmt.Sscanf(filepath.Base(n), "pagemap-%d.img", &pid); err != nil {
			continue
		}
		if err := cc.Resolve(dir, pid); err != nil {
			a.log.Debug("migration: resolving a round ahead", "id", id, "dir", dir, "pid", pid, "err", err)
			return
		}
	}
	a.log.Debug("migration: round resolved ahead", "id", id, "dir", dir, "took", time.Since(t0))
}

// Restore restores a migration's final round. The tree runs, but the
// migration is not committed: until Commit, a rollback kills it.
func (a *Agent) Restore(ctx context.Context, req *agentv1.RestoreRequest) (*agentv1.RestoreReply, error) {
	asked := time.Now()
	m, err := a.preparing(req.Id, "nothing to restore")
	if err != nil {
		return nil, err
	}
	defer m.op.Unlock()
	defer a.renew(m, 0)
	if a.cfg.Fault == "slow-restore" {
		select {
		case <-time.After(2 * time.Second):
		case <-ctx.Done():
		}
	}
	if a.cfg.Fault == "restore" {
		return nil, status.Errorf(codes.Internal, "migration %s: restore failed (fault injected with --fault restore)", req.Id)
	}
	// The final round's images may come with the request (one call
	// fewer between the freeze and the restore).
	if len(req.Files) > 0 {
		if err := a.storeFiles(m, req.Id, req.Round, req.Files); err != nil {
			return nil, err
		}
	}
	// Every stream has arrived (the source waits for each to be stored).
	a.mu.Lock()
	s := m.session
	a.mu.Unlock()
	if s != nil {
		s.stop()
	}
	start := time.Now()
	dir := filepath.Join(a.imagesDir(req.Id), strconv.Itoa(int(req.Round)))
	chains := m.chains
	ropts := restorecore.Options{ImagesDir: dir, Chains: chains, Logger: a.log.With("migration", req.Id)}
	if req.LazyAddress == "" {
		// Pre-copy: the copy stays stopped, and its connections held,
		// until the commit, so that a rollback loses nothing it did.
		// (Post-copy cannot wait: the copy runs to fetch its memory.)
		ropts.LeaveStopped, ropts.KeepNetworkLock = true, true
	}
	var post *postcopy
	if req.LazyAddress != "" {
		if post, err = a.startPostcopy(ctx, req.Id, dir, req.LazyAddress, chains); err != nil {
			return nil, status.Errorf(codes.Aborted, "migration %s: post-copy: %v", req.Id, err)
		}
		ropts.LazyPages, ropts.LazySocket = true, post.Socket
	}
	a.log.Debug("migration: restore starts", "id", req.Id, "since the request", time.Since(asked))
	res, err := restorecore.Restore(ctx, ropts)
	a.log.Debug("migration: restore returned", "id", req.Id, "took", time.Since(start), "err", err)
	if err != nil {
		if post != nil {
			// The daemon may have failed first and killed the tree being
			// made (the source refused a list: its flags check): its
			// error is the cause, the restore's only what followed.
			post.Stop()
			if post.Err != nil && !errors.Is(post.Err, context.Canceled) {
				err = fmt.Errorf("%w (post-copy: %v)", err, post.Err)
			}
		}
		return nil, status.Errorf(codes.Aborted, "migration %s: restore: %v", req.Id, err)
	}
	if post != nil {
		a.mu.Lock()
		m.post = post // a rollback stops it
		a.mu.Unlock()
	}
	go reap(res.Root)
	a.metrics.step("restore", time.Since(start))
	refs := []procRef{}
	for _, t := range append([]int{res.Root}, res.Tids...) {
		if r, err := refOf(t); err == nil {
			refs = append(refs, r)
		}
	}
	a.mu.Lock()
	m.rec.Procs, m.rec.Stopped = refs, ropts.LeaveStopped
	a.mu.Unlock()
	if err := a.setState(m, StateRestored); err != nil {
		signal(refs, unix.SIGKILL)
		return nil, status.Error(codes.Internal, err.Error())
	}
	if a.cfg.Fault == "after-restore" {
		// As a failure here would: the copy runs, but nothing commits it
		// (not even its last page arriving); the coordinator rolls back.
		return nil, status.Errorf(codes.Internal, "migration %s: failing with the tree restored (fault injected with --fault after-restore)", req.Id)
	}
	if post != nil {
		// From here on every page arriving commits the migration, also
		// without the coordinator.
		go a.settlePostcopy(m, post)
	}
	return &agentv1.RestoreReply{Root: int32(res.Root), DurationUs: uint64(time.Since(start).Microseconds())}, nil
}

// postcopy is a post-copy restore under way on a target: the lazy-pages
// daemon serving the restored tree, its pages coming from the source.
type postcopy struct {
	*lazypages.Daemon
	// settled is closed once the migration was committed (every page
	// arrived) or rolled back (the post-copy failed) accordingly.
	settled chan struct{}
}

// startPostcopy starts the lazy-pages daemon of a post-copy restore of
// dir, its pages coming from the source's service at addr (pages the
// earlier rounds sent come from dir's parents).
func (a *Agent) startPostcopy(ctx context.Context, id, dir, addr string, chains *images.ChainCache) (*postcopy, error) {
	// The restore starts while the stream to the source is set up (a TLS
	// handshake: ~10 ms here); the daemon's first request waits for it.
	// It outlives this call, not the daemon.
	dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	remote := lazypages.DialAsync(dctx, "tcp", addr, a.tls, true)
	d, err := lazypages.Start(context.Background(), lazypages.Options{ImagesDir: dir, Chains: chains, Confirm: true,
		Logger: a.log.With("migration", id)}, remote, dcancel)
	if err != nil {
		return nil, err
	}
	return &postcopy{Daemon: d, settled: make(chan struct{})}, nil
}

// settlePostcopy decides a post-copy migration when its daemon returns:
// every page arrived, the tree no longer needs the source: committed;
// otherwise the tree cannot go on: rolled back.
func (a *Agent) settlePostcopy(m *migration, p *postcopy) {
	<-p.Done()
	m.op.Lock()
	defer m.op.Unlock()
	defer close(p.settled)
	if a.statusOf(m).State != StateRestored {
		return // rolled back meanwhile
	}
	if p.Err != nil {
		a.log.Error("migration: post-copy failed; rolling back", "id", m.rec.ID, "err", p.Err)
		a.rollback(m)
		return
	}
	a.log.Info("migration: every page arrived", "id", m.rec.ID, "pages", p.Stats.PagesCopied, "faults", p.Stats.Faults, "took", p.Stats.Duration)
	a.metrics.step("post-copy", p.Stats.Duration)
	if err := a.commit(m); err != nil {
		a.log.Error("migration: commit after post-copy", "id", m.rec.ID, "err", err)
	}
}

// WaitPages waits until a post-copy restore has every page and the
// migration is settled.
func (a *Agent) WaitPages(ctx context.Context, req *agentv1.MigrationRef) (*agentv1.PagesReply, error) {
	m, err := a.get(req.Id)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	p := m.post
	a.mu.Unlock()
	if p == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "migration %s: no post-copy restore here", req.Id)
	}
	select {
	case <-p.settled:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if p.Err != nil {
		return nil, status.Errorf(codes.Aborted, "migration %s: post-copy failed, the restored tree is gone: %v", req.Id, p.Err)
	}
	if st := a.statusOf(m).State; st != StateCommitted {
		return nil, status.Errorf(codes.Aborted, "migration %s: %s", req.Id, st)
	}
	remote := p.Stats.RemotePages
	if remote == 0 && p.Stats.LocalPages == 0 {
		remote = p.Stats.PagesCopied // no parent images: every page came from the source
	}
	return &agentv1.PagesReply{Pages: remote, Faults: p.Stats.Faults, DurationUs: uint64(p.Stats.Duration.Microseconds())}, nil
}

// reap collects the restored root, the agent's child, once it is a
// zombie. It never blocks in wait: a wait by this process would consume
// the ptrace stops of a later dump of the same tree (migrating it on).
func reap(pid int) {
	for {
		time.Sleep(100 * time.Millisecond)
		st, err := proc.ReadStat(pid)
		if err != nil {
			return
		}
		if st.State == 'Z' {
			// A leader shows Z before its other threads are gone; it
			// can be collected only then: try again until it is.
			var ws unix.WaitStatus
			if got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); got == pid || err != nil {
				return
			}
		}
	}
}

// Commit records the migration as done: the target's record is the
// authority on the outcome.
func (a *Agent) Commit(ctx context.Context, req *agentv1.MigrationRef) (*agentv1.MigrationStatus, error) {
	m, err := a.get(req.Id)
	if err != nil {
		return nil, err
	}
	m.op.Lock()
	defer m.op.Unlock()
	a.mu.Lock()
	p := m.post
	a.mu.Unlock()
	if p != nil {
		select {
		case <-p.Done():
		default:
			return nil, status.Errorf(codes.FailedPrecondition, "migration %s: post-copy under way: it commits when every page has arrived (WaitPages)", req.Id)
		}
	}
	if a.recordOf(m).Role != roleTarget {
		return nil, status.Errorf(codes.FailedPrecondition, "migration %s: commit is the target's to record (Finish commits a source)", req.Id)
	}
	if err := a.commit(m); err != nil {
		return nil, err
	}
	if req.DowntimeUs > 0 && !m.downtimeSeen {
		m.downtimeSeen = true
		a.metrics.downtime.Observe(float64(req.DowntimeUs) / 1e6)
	}
	return a.statusOf(m), nil
}
