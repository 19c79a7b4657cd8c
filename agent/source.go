package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/ferrycr/ferry/agent/api/v1"
	"github.com/ferrycr/ferry/dumpcore"
	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/kernel"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/lazypages"
	"github.com/ferrycr/ferry/pageserver"
	"github.com/ferrycr/ferry/restorecore"
	"github.com/ferrycr/ferry/transport"
)

// Info describes this node.
func (a *Agent) Info(ctx context.Context, _ *agentv1.InfoRequest) (*agentv1.NodeInfo, error) {
	return a.node(), nil
}

func (a *Agent) node() *agentv1.NodeInfo {
	k := kernel.Default()
	n := &agentv1.NodeInfo{
		Name:         a.cfg.Name,
		Version:      a.cfg.Version,
		Kernel:       k.Kernel(),
		CpuFlags:     cpuFlags(),
		MemAvailable: memAvailable(),
		Load1:        load1(),
		DirtyTracker: string(k.DirtyTracker()),
		LazyPages:    k.Check("userfaultfd") == nil,
		GrpcAddress:  a.advertised(),
		Vdso:         vdso(),
	}
	n.Migrations = int32(a.inFlight())
	return n
}

// advertised is the gRPC address peers should dial: --listen's, its host
// taken from --page-address or --gossip when --listen names no host.
func (a *Agent) advertised() string {
	host, port, err := net.SplitHostPort(a.Addr())
	if err != nil {
		return a.Addr()
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsUnspecified() {
		return a.Addr()
	}
	for _, h := range []string{a.cfg.PageHost, hostOf(a.cfg.Gossip.Bind)} {
		if ip := net.ParseIP(h); h != "" && (ip == nil || !ip.IsUnspecified()) {
			return net.JoinHostPort(h, port)
		}
	}
	return a.Addr()
}

func hostOf(hostport string) string {
	h, _, _ := net.SplitHostPort(hostport)
	return h
}

// Inspect describes the tree that is to move.
func (a *Agent) Inspect(ctx context.Context, req *agentv1.InspectRequest) (*agentv1.InspectReply, error) {
	pid := int(req.Pid)
	st, err := proc.ReadStat(pid)
	if err != nil || pid <= 0 {
		return nil, status.Errorf(codes.NotFound, "no process %d on %s", req.Pid, a.cfg.Name)
	}
	if _, err := proc.Tids(pid); err != nil {
		return nil, status.Errorf(codes.NotFound, "process %d: %v", pid, err)
	}
	procs := treeOf(pid)
	r := &agentv1.InspectReply{Command: st.Comm, Node: a.node(), Processes: uint32(len(procs))}
	inTree := map[int]bool{}
	for _, p := range procs {
		inTree[p] = true
	}
	// A tree with a PID namespace of its own gets a new one on the
	// target: its PIDs there need not be free.
	mine, _ := proc.Namespace(os.Getpid(), "pid")
	theirs, _ := proc.Namespace(pid, "pid")
	ownPidNs := mine != theirs
	for _, p := range procs {
		if !ownPidNs {
			for _, t := range tasksOf(p) {
				r.Pids = append(r.Pids, int32(t))
			}
		}
		// A session or group whose leader is dead is made on the target
		// by a helper with the leader's PID (internal/treeplan).
		if ps, err := proc.ReadStat(p); err == nil && p != pid && !ownPidNs {
			for _, id := range []int{ps.Sid, ps.Pgid} {
				if !inTree[id] && id != st.Sid && id != st.Pgid {
					inTree[id] = true
					r.Pids = append(r.Pids, int32(id))
				}
			}
		}
		// Resident memory of the tree (what children share with their
		// parent counts twice: an upper bound).
		if b, err := os.ReadFile(proc.Path(p, "statm")); err == nil {
			if f := strings.Fields(string(b)); len(f) > 1 {
				n, _ := strconv.ParseUint(f[1], 10, 64)
				r.Rss += n * uint64(os.Getpagesize())
			}
		}
	}
	return r, nil
}

// treeOf lists pid and its descendants, parents first.
func treeOf(pid int) []int {
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		out = append(out, proc.Children(out[i])...)
	}
	return out
}

// tasksOf lists the threads of process pid (a zombie: pid alone).
func tasksOf(pid int) []int {
	tids, err := proc.Tids(pid)
	if err != nil || len(tids) == 0 {
		return []int{pid}
	}
	return tids
}

// treeRefs names every thread of the tree of pid by PID and start time.
func treeRefs(pid int) []procRef {
	var refs []procRef
	for _, p := range treeOf(pid) {
		for _, t := range tasksOf(p) {
			if r, err := refOf(t); err == nil {
				refs = append(refs, r)
			}
		}
	}
	return refs
}

// Round runs one pre-copy round, or the final dump, of a migration's
// source, streaming its pages to the target's page-server session.
func (a *Agent) Round(ctx context.Context, req *agentv1.RoundRequest) (*agentv1.RoundReply, error) {
	if err := checkID(req.Id); err != nil {
		return nil, err
	}
	if req.Round < 1 {
		return nil, status.Errorf(codes.InvalidArgument, "round %d: rounds count from 1", req.Round)
	}
	lease := a.lease(req.LeaseMs)
	a.mu.Lock()
	m, ok := a.migs[req.Id]
	if !ok {
		m = &migration{rec: record{ID: req.Id, Role: roleSource, State: StateRunning, Pid: int(req.Pid), Peer: req.TargetAddress, LeaseMs: req.LeaseMs}}
		m.rec.LeaseUntil = time.Now().Add(lease)
		if err := a.save(m); err != nil {
			a.mu.Unlock()
			return nil, status.Errorf(codes.Internal, "recording migration %s: %v", req.Id, err)
		}
		a.migs[req.Id] = m
	}
	a.mu.Unlock()
	m.op.Lock()
	defer m.op.Unlock()
	a.renew(m, lease)
	defer a.renew(m, lease)

	rec := a.recordOf(m)
	if rec.Role != roleSource || rec.State != StateRunning || rec.Pid != int(req.Pid) {
		return nil, status.Errorf(codes.FailedPrecondition, "migration %s: no round for pid %d now (%s here, state %s)", req.Id, req.Pid, rec.Role, rec.State)
	}
	dir := filepath.Join(a.sourceDir(req.Id), strconv.Itoa(int(req.Round)))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	start := time.Now()
	client, err := pageserver.Connect(ctx, "tcp", req.PageAddress, a.tls, !req.NoCompress)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "round %d: %v", req.Round, err)
	}
	m.roundSent.Store(0)
	m.round.Store(req.Round)
	defer m.round.Store(0)
	sink := &recordingSink{PageSink: client, sent: map[string]bool{}, bytes: &m.roundSent}
	defer client.Abort()
	opts := dumpcore.Options{
		Pid:            int(req.Pid),
		ImagesDir:      dir,
		PreDump:        !req.Final,
		LeaveStopped:   req.Final,
		NoPageData:     req.Final && req.Lazy,
		PageSink:       sink,
		TCPEstablished: req.TcpEstablished,
		// The connections stay held while the tree is frozen: its copy
		// on the target takes them over.
		HoldConnections: req.Final && req.TcpEstablished,
		// smaps walks every page table (~35 ms at 4 GiB): the final
		// round reads the flags before the freeze, and they are checked
		// against the stopped tree before its memory leaves.
		FlagsBeforeFreeze: req.Final,
		Version:           a.cfg.Version,
		Logger:            a.log.With("migration", req.Id, "round", req.Round),
	}
	if req.Round > 1 {
		opts.PrevImagesDir = "../" + strconv.Itoa(int(req.Round)-1)
	}
	var frozenAt time.Time
	if req.Final {
		opts.Frozen = func() { frozenAt = time.Now() }
	}
	res, err := dumpcore.Dump(ctx, opts)
	if err != nil && req.Final {
		// A final dump that failed after its commit point (writing or
		// sending images) leaves the tree stopped as asked: resume it.
		if st, e := proc.ReadStat(int(req.Pid)); e == nil && st.State == 'T' {
			a.resumeSource(int(req.Pid), treeRefs(int(req.Pid)))
		}
	}
	if err != nil {
		return nil, status.Errorf(codes.Aborted, "round %d of pid %d: %v", req.Round, req.Pid, err)
	}
	if req.Final {
		// The trackers go once the tree is killed or resumed
		// (stopSession).
		m.release = res.Release
		// The tree is stopped by SIGSTOP and detached: a freeze that
		// outlives this agent. Record it before anything else.
		refs := treeRefs(int(req.Pid))
		if len(refs) == 0 {
			m.stopSession()
			return nil, status.Errorf(codes.Aborted, "round %d: process %d vanished after its final dump", req.Round, req.Pid)
		}
		a.mu.Lock()
		m.rec.Procs = refs
		a.mu.Unlock()
		if err := a.setState(m, StateFrozen); err != nil {
			a.resumeSource(int(req.Pid), refs)
			m.stopSession()
			return nil, status.Error(codes.Internal, err.Error())
		}
	}
	files, err := readImages(dir, sink.sent)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	st := res.Stats
	a.metrics.rounds.Inc()
	a.metrics.bytes.WithLabelValues("sent").Add(float64(st.PagesWritten) * float64(os.Getpagesize()))
	if req.Final {
		a.metrics.step("final-round", time.Since(start))
	} else {
		a.metrics.step("round", time.Since(start))
	}
	reply := &agentv1.RoundReply{
		PagesWritten: st.PagesWritten,
		PagesSkipped: st.PagesSkippedParent,
		Bytes:        st.PagesWritten * uint64(os.Getpagesize()),
		DurationUs:   uint64(time.Since(start).Microseconds()),
		FrozenUs:     st.FrozenTimeUs,
		Files:        files,
	}
	if req.Final && a.cfg.Fault == "flags-moved" {
		res.FlagsCheck = func() error {
			time.Sleep(50 * time.Millisecond) // as long as smaps of a large process
			return errors.New("a memory mapping changed as the process was frozen (fault injected with --fault flags-moved)")
		}
	}
	if req.Final && req.Lazy {
		// The lazy pages stay in the stopped tree: serve them. Unlisted,
		// they are not counted, and the rest went with the images.
		reply.Unlisted = res.Unlisted
		if !res.Unlisted {
			reply.PagesWritten, reply.Bytes, reply.PagesLazy = 0, 0, st.PagesWritten
		}
		s, err := a.servePages(m, dir, res.FlagsCheck, res.Unlisted)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "round %d: serving the pages: %v", req.Round, err)
		}
		reply.LazyAddress = s.addr
	}
	if req.Final && !frozenAt.IsZero() {
		reply.FrozenUntilReplyUs = uint64(time.Since(frozenAt).Microseconds())
	}
	return reply, nil
}

// servePages serves the memory of m's stopped tree to the target's
// lazy-pages daemon (one connection, until the daemon has every page).
// check (if not nil) tells whether the images stand (dumpcore's
// FlagsCheck); until it passes, no list is answered: the target's tree
// may run on the pages it faults in, but its daemon cannot finish without
// a list for every process (lazypages.Options.Confirm), so the migration
// cannot commit. A failure ends the serving: the target's tree is stopped
// and the source resumed, as after any post-copy failure. With the lazy
// memory listed in the images (unlisted false), the list is empty: only
// the word that the images stand.
func (a *Agent) servePages(m *migration, dir string, check func() error, unlisted bool) (*session, error) {
	a.mu.Lock()
	id := m.rec.ID
	// The daemon names processes by the images' PIDs: a tree in a PID
	// namespace of its own has its own there (the innermost of NSpid).
	tree := map[int]int{}
	for _, r := range m.rec.Procs {
		inner := r.Pid
		if st, err := proc.ReadStatus(r.Pid); err == nil && len(st.NSpid) > 0 {
			inner = st.NSpid[len(st.NSpid)-1]
		}
		tree[inner] = r.Pid
	}
	a.mu.Unlock()
	l, err := transport.Listen(net.JoinHostPort(a.cfg.PageHost, "0"), a.tls)
	if err != nil {
		return nil, err
	}
	log := a.log.With("migration", id)
	ctx, cancel := context.WithCancel(context.Background())
	s := &session{addr: l.Addr().String(), cancel: cancel, done: make(chan struct{})}
	// The memory the final round left unlisted (lazypages.Unlisted) is
	// listed when the daemon asks, from the VMAs in its images.
	list := func(pid int) ([][2]uint64, error) {
		here, ok := tree[pid]
		if !ok {
			return nil, fmt.Errorf("process %d is not in migration %s", pid, id)
		}
		if check != nil {
			if err := check(); err != nil {
				return nil, err
			}
		}
		if !unlisted {
			return nil, nil
		}
		var mm pb.MmCore
		if err := images.ReadOne(dir, images.MmName(int32(pid)), images.KindMm, &mm); err != nil {
			return nil, err
		}
		return lazypages.ListPresent(here, mm.Vmas)
	}
	read := func(pid int, vaddr uint64, buf []byte) error {
		here, ok := tree[pid]
		if !ok {
			return fmt.Errorf("process %d is not in migration %s", pid, id)
		}
		if a.cfg.Fault == "slow-pages" {
			time.Sleep(time.Duration(1+len(buf)>>16) * 5 * time.Millisecond)
		}
		a.metrics.bytes.WithLabelValues("served").Add(float64(len(buf)))
		return compel.ReadMem(here, []compel.Segment{{Addr: vaddr, Local: buf}})
	}
	go func() {
		defer close(s.done)
		defer l.Close()
		if err := lazypages.ServeSession(ctx, l, log, read, list); err != nil {
			if ctx.Err() == nil {
				log.Error("migration: serving pages", "err", err)
			}
			return
		}
		log.Info("migration: the target has every page")
	}()
	a.mu.Lock()
	m.session = s
	a.mu.Unlock()
	return s, nil
}

// recordingSink remembers the files it sent, which the reply leaves out,
// and counts the bytes of page data written (progress).
type recordingSink struct {
	dumpcore.PageSink
	sent  map[string]bool
	bytes *atomic.Uint64
}

func (r *recordingSink) Create(name string) (io.WriteCloser, error) {
	r.sent[name] = true
	w, err := r.PageSink.Create(name)
	if err != nil || !strings.HasPrefix(name, "pages-") {
		return w, err
	}
	return &countingWriter{WriteCloser: w, n: r.bytes}, nil
}

type countingWriter struct {
	io.WriteCloser
	n *atomic.Uint64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.WriteCloser.Write(b)
	c.n.Add(uint64(n))
	return n, err
}

// readImages returns the files of dir not in skip.
func readImages(dir string, skip map[string]bool) (map[string][]byte, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := map[string][]byte{}
	for _, e := range ents {
		if !e.Type().IsRegular() || skip[e.Name()] {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, err
		}
		out[e.Name()] = b
	}
	return out, nil
}

// cpuFlags returns the first processor's flags from /proc/cpuinfo, read
// once: node() runs for every Info call and gossip update.
var cpuFlags = sync.OnceValue(func() []string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return nil
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "flags" {
			return strings.Fields(v)
		}
	}
	return nil
})

// vdso is the kernel's vDSO fingerprint ("" if unreadable), read once.
var vdso = sync.OnceValue(func() string {
	v, _ := restorecore.VdsoFingerprint()
	return v
})

func memAvailable() uint64 {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "MemAvailable:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				n, _ := strconv.ParseUint(f[0], 10, 64)
				return n << 10
			}
		}
	}
	return 0
}

func load1() float64 {
	b, _ := os.ReadFile("/proc/loadavg")
	f := bytes.Fields(b)
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(string(f[0]), 64)
	return v
}
