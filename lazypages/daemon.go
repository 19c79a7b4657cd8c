package lazypages

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/uffd"
)

// SocketName is the daemon's socket in the work directory, as criu names it.
const SocketName = "lazy-pages.socket"

const magic = "FERRYLZ1"

// Features a restore asks for on the userfaultfd it hands over.
const Features = uffd.FeatureEventRemap | uffd.FeatureEventRemove | uffd.FeatureEventUnmap | uffd.FeatureEventFork

// Options configure the daemon.
type Options struct {
	ImagesDir string
	Socket    string
	// Remote, when set, supplies the page data (a page server in lazy
	// mode); the images directory still gives the pagemap and VMAs.
	Remote Source
	// Chains, when set, has parent image sets resolved ahead (a
	// migration's pre-copy rounds).
	Chains *images.ChainCache
	// Confirm: the daemon does not finish before the source has answered
	// a list for every process, also those whose images list their
	// memory (the list is then only the source's word that its images
	// stand: a migration's source answers once its checks pass).
	Confirm bool
	// Ready is called once the socket listens (--status-fd).
	Ready func()
	// PrefetchRate limits the background delivery of pages nobody has
	// asked for yet, in bytes per second (0: as fast as possible); faults
	// are always served at once.
	PrefetchRate int64
	Logger       *slog.Logger
}

// Stats describe a finished post-copy.
type Stats struct {
	Faults, PagesCopied, PagesZero, PagesDropped uint64
	// With a page server: pages read from it, and from local parent
	// images (sent by earlier rounds, not sent again).
	RemotePages, LocalPages uint64
	Duration                time.Duration
	// FaultWaitMax is the longest a fault took to serve: its pages read
	// (from a page server, after what it was sending then) and copied in.
	FaultWaitMax time.Duration
}

// Serve waits for a restore to hand over its processes (each with lazy
// memory) and serves their memory until every page is delivered.
func Serve(ctx context.Context, opts Options) (*Stats, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	expect, err := lazyProcesses(opts.ImagesDir)
	if err != nil {
		return nil, err
	}
	os.Remove(opts.Socket)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: opts.Socket, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("lazy-pages: listen: %w", err)
	}
	defer os.Remove(opts.Socket)
	defer l.Close()
	// Index the processes' pages (a fragmented 4 GiB process has ~200,000
	// runs) while the restore, told we are ready, loads its images and
	// makes the processes: a handover waits for the index, not the start.
	s, err := newServer(log, opts.PrefetchRate)
	if err != nil {
		return nil, err
	}
	defer s.close()
	preps := map[int]*prepared{}
	indexed := make(chan struct{})
	var indexErr error
	go func() {
		defer close(indexed)
		for _, pid := range expect {
			p, err := prepare(opts, pid, log)
			if err != nil {
				indexErr = err
				return
			}
			preps[pid] = p
			s.startList(p)
		}
	}()
	defer func() {
		<-indexed
		for _, p := range preps {
			p.chain.Close()
		}
	}()
	if opts.Ready != nil {
		opts.Ready()
	}
	go func() { <-ctx.Done(); l.Close() }()
	// One handover per process with lazy memory (without images to tell,
	// just one), taken while the processes handed over already are
	// served: a process being restored may touch its lazy memory (rseq,
	// robust lists) before the next one is handed over. Fills, asked for
	// on the way, are served at once.
	want := max(len(expect), 1)
	rc, err := l.SyscallConn()
	if err != nil {
		return nil, err
	}
	rc.Control(func(fd uintptr) { s.lfd = int(fd) })
	s.handovers = want
	s.accept = func() error {
		conn, err := l.AcceptUnix()
		if err != nil {
			return fmt.Errorf("lazy-pages: accept: %w", err)
		}
		defer conn.Close()
		pid, osPid, fd, kind, err := recvHandover(conn, opts, log)
		if err != nil || kind == msgFill {
			return err
		}
		if kind == msgResumed {
			if !s.resumed {
				s.resumed = true
				close(s.running)
			}
			log.Debug("the restore resumed the tree: prefetching")
			conn.Write([]byte{0})
			return nil
		}
		u := uffd.AdoptNoHandshake(fd, Features)
		<-indexed
		if indexErr != nil {
			conn.Write([]byte(indexErr.Error()))
			u.Close()
			return indexErr
		}
		p := preps[pid]
		if p == nil {
			if p, err = prepare(opts, pid, log); err != nil {
				conn.Write([]byte(err.Error()))
				u.Close()
				return err
			}
			preps[pid] = p
			s.startList(p)
		}
		c := &client{u: u, name: fmt.Sprintf("process %d", pid), pend: p.pend, pid: pid, osPid: osPid, src: p.src, main: true,
			unlisted: p.unlisted, confirm: p.confirm}
		if ranges, ok := s.listed[pid]; ok {
			if c.unlisted {
				c.pend = c.pend.restrict(ranges)
			}
			c.unlisted, c.confirm = false, false
		}
		s.clients = append(s.clients, c)
		s.handovers--
		if !s.resumed {
			s.holdUntil = time.Now().Add(resumeWait)
		}
		if _, err := conn.Write([]byte{0}); err != nil {
			return err
		}
		log.Info("serving lazy pages", "pid", pid, "pages", c.pend.pages())
		return nil
	}
	start := time.Now()
	err = s.loop(ctx)
	s.stats.Duration = time.Since(start)
	if err != nil {
		// Closing the userfaultfds would let the processes read zeros
		// where their memory was never delivered: end them instead.
		s.killClients()
	}
	for _, p := range preps {
		if ms, ok := p.src.(*mixedSource); ok {
			s.stats.RemotePages += ms.stats.RemotePages
			s.stats.LocalPages += ms.stats.LocalPages
		}
	}
	log.Info("lazy pages done", "processes", want, "faults", s.stats.Faults, "copied", s.stats.PagesCopied,
		"zero", s.stats.PagesZero, "dropped", s.stats.PagesDropped, "remote", s.stats.RemotePages,
		"local", s.stats.LocalPages, "longest fault", s.stats.FaultWaitMax, "took", s.stats.Duration)
	return &s.stats, err
}

// killClients ends the restored processes, with every process they
// forked: after a failed post-copy they would run on zero pages where
// their memory was not delivered, and a tree is restored whole or not.
func (s *server) killClients() {
	for _, c := range s.clients {
		if !c.main {
			continue
		}
		pids := []int{c.osPid}
		for i := 0; i < len(pids); i++ {
			unix.Kill(pids[i], unix.SIGSTOP) // no more forks while we look
			pids = append(pids, proc.Children(pids[i])...)
		}
		for _, pid := range pids {
			unix.Kill(pid, unix.SIGKILL)
		}
		s.log.Error("post-copy failed: killed the restored process, its memory is incomplete",
			"pid", c.pid, "processes", len(pids), "pages_missing", c.pend.pages())
	}
}

// lazyProcesses lists the processes of the images in dir that a restore
// with --lazy-pages hands over: the live ones with lazy memory areas.
func lazyProcesses(dir string) ([]int, error) {
	r, err := images.Open(dir, images.PstreeName, images.KindPstree)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	defer r.Close()
	var out []int
	for {
		e := &pb.PstreeEntry{}
		if err := r.Next(e); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, err
		}
		if len(e.Threads) == 0 {
			continue // a zombie
		}
		mm := &pb.MmCore{}
		if err := images.ReadOne(dir, images.MmName(e.Pid), images.KindMm, mm); err != nil {
			return nil, err
		}
		for _, v := range mm.Vmas {
			if Lazy(v) {
				out = append(out, int(e.Pid))
				break
			}
		}
	}
	return out, nil
}

// prepared is what serving process pid needs from the images: where its
// pages come from and which are still to deliver.
type prepared struct {
	pid   int
	src   Source
	pend  pending
	stats Stats
	chain images.PageChain // open page files, closed when done
	// confirm: the source's list is awaited only as its word that the
	// images stand (Options.Confirm).
	confirm bool
	// unlisted: the pagemap leaves the lazy memory out (PagemapHead);
	// pend holds it whole until src lists it.
	unlisted bool
}

func prepare(opts Options, pid int, log *slog.Logger) (*prepared, error) {
	t0 := time.Now()
	p := &prepared{pid: pid}
	p.chain.Cache = opts.Chains
	// The pages the process had: from the resolved images, or (with a
	// remote source) from the pagemap alone.
	mm := &pb.MmCore{}
	if err := images.ReadOne(opts.ImagesDir, images.MmName(pid), images.KindMm, mm); err != nil {
		return nil, err
	}
	head, entries, err := images.ReadPagemap(opts.ImagesDir, int32(pid))
	if err != nil {
		return nil, err
	}
	n := len(entries)
	switch {
	case head.Unlisted:
		// The dump left the lazy memory unlisted: all of it is pending
		// (a fault fetches whatever is there, zeros where nothing is)
		// until the page server's list narrows it to the present pages.
		if _, ok := opts.Remote.(Lister); !ok {
			return nil, fmt.Errorf("the images of process %d do not list its memory (dump --lazy-pages): it comes from that dump's page server (--page-server)", pid)
		}
		p.src, p.unlisted = opts.Remote, true
		keep := func(e images.PageEntry) bool { return inUnlisted(mm.Vmas, e.Vaddr) }
		if slices.ContainsFunc(entries, keep) {
			// The pages the restore and the threads touch first (in
			// lazy memory, listed with their data) are read from here.
			runs, err := p.chain.ResolveEntries(opts.ImagesDir, int32(pid), head, entries, keep)
			switch {
			case err == nil && len(runs) > 0:
				local := localSource{runs}
				p.src = &mixedSource{local: local, remote: opts.Remote, stats: &p.stats,
					isOwn: func(va uint64) bool { return !local.has(va) }}
			case err != nil && !errors.Is(err, os.ErrNotExist):
				p.chain.Close()
				return nil, err
			}
		}
		var spans []pendSpan
		for _, v := range mm.Vmas {
			if Unlisted(v) {
				spans = append(spans, pendSpan{v.Start, v.End, v.Start})
			}
		}
		sort.Slice(spans, func(i, j int) bool { return spans[i].start < spans[j].start })
		p.pend = newPending(spans)
	case opts.Remote != nil:
		t1 := time.Now()
		src, ranges, err := mixed(opts, pid, entries, &p.stats, &p.chain)
		if err != nil {
			p.chain.Close()
			return nil, err
		}
		t2 := time.Now()
		p.src = src
		if opts.Confirm {
			if _, ok := src.(Lister); !ok {
				p.chain.Close()
				return nil, errors.New("the page server cannot confirm its images (no lists)")
			}
			p.confirm = true
		}
		p.pend = newPending(lazySpans(mm.Vmas, ranges, func(r [2]uint64) (uint64, uint64) { return r[0], r[1] }))
		log.Debug("pages split", "pid", pid, "read", t1.Sub(t0), "sources", t2.Sub(t1), "spans", time.Since(t2))
	default:
		runs, err := p.chain.ResolveEntries(opts.ImagesDir, int32(pid), head, entries, nil)
		if err != nil {
			p.chain.Close()
			return nil, err
		}
		p.src, n = localSource{runs}, len(runs)
		p.pend = newPending(lazySpans(mm.Vmas, runs, func(r images.PageRun) (uint64, uint64) {
			return r.Vaddr, r.Vaddr + uint64(len(r.Data))
		}))
	}
	log.Debug("pages indexed", "pid", pid, "runs", n, "pages", p.pend.pages(), "took", time.Since(t0))
	return p, nil
}

// lazySpans intersects the page ranges (in address order, disjoint; bounds
// gives each one's start and end) with the lazy VMAs, splitting ranges at
// VMA bounds: UFFDIO_COPY must stay within one VMA.
func lazySpans[R any](vmas []*pb.Vma, ranges []R, bounds func(R) (uint64, uint64)) []pendSpan {
	vs := make([]*pb.Vma, 0, len(vmas))
	for _, v := range vmas {
		if Lazy(v) {
			vs = append(vs, v)
		}
	}
	sort.Slice(vs, func(i, j int) bool { return vs[i].Start < vs[j].Start })
	// At most one span per range, plus one per VMA bound splitting one.
	out := make([]pendSpan, 0, len(ranges)+len(vs))
	i := 0
	for _, v := range vs {
		for i < len(ranges) {
			if _, end := bounds(ranges[i]); end > v.Start {
				break
			}
			i++
		}
		for k := i; k < len(ranges); k++ {
			start, end := bounds(ranges[k])
			if start >= v.End {
				break
			}
			if a, b := max(v.Start, start), min(v.End, end); a < b {
				out = append(out, pendSpan{a, b, a})
			}
		}
	}
	return out
}

// client is one address space being served: the restored process, or a
// child it forked during post-copy (same pages missing, own userfaultfd).
type client struct {
	u    *uffd.FD
	pend pending
	name string
	// pid names the process whose pages these are, in src (its PID in
	// the images), osPid the process here; main: a restored process (not
	// a child it forked during post-copy), which must not exit before
	// its memory is all there.
	pid, osPid int
	src        Source
	main       bool
	// retry holds faults that could not be served yet (EAGAIN while the
	// address space was changing); they are served again each round.
	retry []uffd.Msg
	// confirm: the source's list is still awaited (Options.Confirm).
	confirm bool
	// unlisted: pend still holds the unlisted memory whole (faults are
	// served, nothing is prefetched) until its list arrives.
	unlisted bool
	// ahead: prefetch requests have been sent for the pending pages below
	// it (the scan starts over when it finds nothing above).
	ahead uint64
}

type server struct {
	clients []*client
	// lfd is the socket handovers arrive on, handovers how many are still
	// to come, accept takes one (or serves a fill request).
	lfd       int
	handovers int
	accept    func() error
	buf       []byte
	log       *slog.Logger
	stats     Stats
	// rate limits background prefetch (bytes per second; 0: none).
	rate       int64
	prefetched int64
	// Lists of unlisted memory arrive on lists (asked for by startList),
	// each with a byte on the wake pipe; listed keeps them by PID.
	lists  chan listResult
	wake   [2]int
	listed map[int][][2]uint64
	// flights are the prefetch requests in flight, oldest first (at most
	// aheadDepth; their buffers come back to spare).
	flights []*flight
	spare   [][]byte
	// wmu guards the wake pipe's writes against its closing.
	wmu    sync.Mutex
	closed bool
	// Prefetch waits while the restore still works on the processes
	// handed over (it would take the CPUs the restore needs: the
	// process would run later): until the restore says the tree runs
	// (resumed), or until holdUntil if it does not say so. Faults are
	// served meanwhile.
	resumed   bool
	holdUntil time.Time
	// running is closed when resumed is set, for the list goroutines.
	running chan struct{}
}

// resumeWait: how long prefetch waits for the restore's word that the
// tree runs, after a handover.
const resumeWait = 2 * time.Second

// holding tells whether prefetch waits for the restore, and how long at
// most.
func (s *server) holding() (bool, time.Duration) {
	if s.resumed || s.holdUntil.IsZero() {
		return false, 0
	}
	left := time.Until(s.holdUntil)
	return left > 0, left
}

// flight is a prefetch request in flight: n bytes for c at va, which the
// images have at src.
type flight struct {
	c       *client
	va, src uint64
	buf     []byte
	f       *Flight
}

type listResult struct {
	pid    int
	ranges [][2]uint64
	err    error
}

func newServer(log *slog.Logger, rate int64) (*server, error) {
	s := &server{log: log, buf: make([]byte, prefetchChunk), rate: rate,
		lists: make(chan listResult, 64), listed: map[int][][2]uint64{}, running: make(chan struct{})}
	if err := unix.Pipe2(s.wake[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, os.NewSyscallError("pipe2", err)
	}
	return s, nil
}

func (s *server) close() {
	for _, c := range s.clients {
		c.u.Close()
	}
	s.wmu.Lock()
	s.closed = true
	unix.Close(s.wake[0])
	unix.Close(s.wake[1])
	s.wmu.Unlock()
}

// startList asks p's source for the list of its unlisted memory, which
// the loop applies when it arrives.
func (s *server) startList(p *prepared) {
	if !p.unlisted && !p.confirm {
		return
	}
	go func() {
		// Asked once the tree runs: listing walks the source's page
		// tables (~25 ms at 4 GiB), CPU the restore would wait for.
		select {
		case <-s.running:
		case <-time.After(resumeWait):
		}
		t0 := time.Now()
		ranges, err := p.src.(Lister).List(p.pid)
		s.log.Debug("unlisted memory listed", "pid", p.pid, "ranges", len(ranges), "took", time.Since(t0), "err", err)
		s.lists <- listResult{p.pid, ranges, err}
		s.notify()
	}()
}

// takeLists applies the lists that arrived: from now on only the pages
// present in the source are pending (and prefetched). The wake pipe also
// says that prefetch replies arrived; took is false if that was all.
func (s *server) takeLists() (took bool, err error) {
	var b [64]byte
	for {
		if n, _ := unix.Read(s.wake[0], b[:]); n <= 0 {
			break
		}
	}
	for {
		select {
		case l := <-s.lists:
			if l.err != nil {
				return false, l.err
			}
			took = true
			s.listed[l.pid] = l.ranges
			for _, c := range s.clients {
				if c.pid == l.pid && c.confirm {
					c.confirm = false
					s.log.Debug("the source confirmed its images", "client", c.name)
				}
				if c.pid == l.pid && c.unlisted {
					c.pend, c.unlisted = c.pend.restrict(l.ranges), false
					s.log.Info("memory listed", "client", c.name, "pages", c.pend.pages())
				}
			}
		default:
			return took, nil
		}
	}
}

const (
	faultChunk    = 64 << 10
	prefetchChunk = 1 << 20
	// aheadChunk and aheadDepth: prefetch requests to a remote source,
	// that many in flight at once, so that the page server reads and
	// sends the next chunks while this side copies one in (one at a time,
	// each side waiting for the other, 1 GiB took 5.3 s here; 2.4 s so).
	// Faults do not wait behind them: they go on a stream of their own
	// (RemoteSource.ReadUrgent).
	aheadChunk = 512 << 10
	aheadDepth = 8
)

// requester is a Source that takes requests ahead (RemoteSource).
type requester interface {
	Request(pid int, vaddr uint64, buf []byte, notify func()) *Flight
}

// deliver copies up to n bytes of pending span sp of c starting at va;
// for a fault (urgent), read on the page server's stream for faults, not
// behind the prefetches in flight.
func (s *server) deliver(c *client, sp pendSpan, va, n uint64, urgent bool) error {
	n = min(n, sp.end-va)
	src := s.buf[:n]
	read := c.src.Read
	if urgent {
		read = func(pid int, vaddr uint64, buf []byte) error { return readUrgent(c.src, pid, vaddr, buf) }
	}
	if err := read(c.pid, sp.src+(va-sp.start), src); err != nil {
		return fmt.Errorf("pages %#x+%d: %w", va, n, err)
	}
	return s.place(c, va, src)
}

// place copies src into c's memory at va, whose pages are pending. Large
// copies are split between threads: filling fresh memory is what bounds
// post-copy (the kernel allocates each page; on a VM the host maps it on
// first touch, and that cost grows with the CPUs that share it).
func (s *server) place(c *client, va uint64, src []byte) error {
	parts := min(copyThreads, len(src)/minCopyPart)
	if parts <= 1 {
		done, err := copyIn(c.u, va, src)
		return s.placed(c, va, len(src), done, err)
	}
	size := (len(src)/parts + pageSize - 1) &^ (pageSize - 1)
	type part struct {
		off, end, done int
		err            error
	}
	res := make([]part, parts)
	for i := range res {
		res[i].off, res[i].end = i*size, min(i*size+size, len(src))
	}
	copyPart := func(p *part) { p.done, p.err = copyIn(c.u, va+uint64(p.off), src[p.off:p.end]) }
	var wg sync.WaitGroup
	for i := 1; i < parts; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); copyPart(&res[i]) }()
	}
	copyPart(&res[0])
	wg.Wait()
	var first error
	for _, p := range res {
		if err := s.placed(c, va+uint64(p.off), p.end-p.off, p.done, p.err); err != nil && (first == nil || errors.Is(first, errAgain)) {
			first = err
		}
	}
	return first
}

// minCopyPart is the smallest part of a chunk a thread copies alone.
const minCopyPart = 128 << 10

// copyThreads copy one chunk together (on this 2-CPU VM, 4 GiB came in
// about 15% sooner with two than with one; more CPUs than the page
// stream leaves idle would not help).
var copyThreads = min(runtime.NumCPU(), 4)

// copyIn copies src to va. A page that is there already (a racing fault
// or event) is skipped: the rest is copied page by page. It only makes
// system calls, so parts of one chunk may be copied at once.
func copyIn(u *uffd.FD, va uint64, src []byte) (int, error) {
	done, err := u.Copy(va, src, false)
	if !errors.Is(err, uffd.ErrExist) {
		return done, err
	}
	for off := uint64(done) &^ (pageSize - 1); off < uint64(len(src)); off += pageSize {
		if _, err := u.Copy(va+off, src[off:off+pageSize], false); err != nil && !errors.Is(err, uffd.ErrExist) {
			return int(off), err
		}
	}
	return len(src), nil
}

// placed accounts for a copy of n bytes to va that copied done of them,
// and failed with err.
func (s *server) placed(c *client, va uint64, n, done int, err error) error {
	switch {
	case errors.Is(err, unix.EAGAIN):
		// The address space is changing (fork, mremap in progress) until
		// its event is read: keep what was not copied pending.
		c.pend.remove(va, va+uint64(done))
		s.stats.PagesCopied += uint64(done) / pageSize
		return errAgain
	case err == nil:
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ESRCH):
		// The range or the whole address space is gone (unmapped, or the
		// process exited): an event follows, or the client is dropped.
	default:
		return err
	}
	c.pend.remove(va, va+uint64(n))
	s.stats.PagesCopied += uint64(n) / pageSize
	return nil
}

// prefetch delivers pages nobody asked for yet, from the lowest pending
// spans (memory with holes has spans of a few pages): up to prefetchChunk
// bytes at once from a source that answers one request at a time, else
// what arrived of the requests in flight, keeping aheadDepth of them
// going. idle: nothing arrived and nothing more could be asked for (wait
// for the wake pipe).
func (s *server) prefetch() (idle bool, err error) {
	if len(s.flights) > 0 || s.canRequest() {
		return s.prefetchAhead()
	}
	budget := uint64(prefetchChunk)
	for _, c := range s.clients {
		if c.unlisted {
			continue // not yet known what is there
		}
		for budget > 0 {
			sp, ok := c.pend.first()
			if !ok {
				break
			}
			n := min(budget, sp.end-sp.start)
			if err := s.deliver(c, sp, sp.start, n, false); err != nil {
				if errors.Is(err, errAgain) {
					return false, nil // read the events first
				}
				return false, fmt.Errorf("%s: %w", c.name, err)
			}
			budget -= n
			s.prefetched += int64(n)
		}
		if budget == 0 {
			break
		}
	}
	return false, nil
}

// canRequest tells whether some client's source takes requests ahead.
func (s *server) canRequest() bool {
	for _, c := range s.clients {
		if _, ok := c.src.(requester); ok && !c.unlisted && !c.pend.empty() {
			return true
		}
	}
	return false
}

func (s *server) prefetchAhead() (idle bool, err error) {
	arrived := 0
	for len(s.flights) > 0 {
		fl := s.flights[0]
		select {
		case <-fl.f.Done():
		default:
			goto more
		}
		s.flights = s.flights[1:]
		arrived++
		err := fl.f.Err()
		if err == nil && slices.Contains(s.clients, fl.c) {
			err = s.land(fl)
		}
		s.spare = append(s.spare, fl.buf)
		if errors.Is(err, errAgain) {
			return false, nil // read the events first
		} else if err != nil {
			return false, fmt.Errorf("%s: pages %#x+%d: %w", fl.c.name, fl.va, len(fl.buf), err)
		}
	}
more:
	sent := 0
	for len(s.flights) < aheadDepth && s.request() {
		sent++
	}
	return arrived == 0 && sent == 0, nil
}

// request sends the next prefetch request, if there is one to send.
func (s *server) request() bool {
	for _, c := range s.clients {
		rq, ok := c.src.(requester)
		if !ok || c.unlisted {
			continue
		}
		sp, ok := c.pend.from(c.ahead)
		if !ok {
			if c.ahead != 0 && !s.inFlight(c) {
				c.ahead = 0 // pages left behind (moved, or not placed): again
			}
			continue
		}
		va := max(sp.start, c.ahead)
		n := min(aheadChunk, sp.end-va)
		var buf []byte
		if k := len(s.spare); k > 0 {
			buf, s.spare = s.spare[k-1], s.spare[:k-1]
		} else {
			buf = make([]byte, aheadChunk)
		}
		buf = buf[:n]
		fl := &flight{c: c, va: va, src: sp.src + (va - sp.start), buf: buf}
		fl.f = rq.Request(c.pid, fl.src, buf, s.notify)
		s.flights = append(s.flights, fl)
		c.ahead = va + n
		return true
	}
	return false
}

func (s *server) inFlight(c *client) bool {
	return slices.ContainsFunc(s.flights, func(fl *flight) bool { return fl.c == c })
}

// notify wakes the loop: a prefetch reply or a list arrived. Replies may
// come after the server is closed (a failed post-copy aborts the stream):
// the pipe's number may be another file's by then.
func (s *server) notify() {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if !s.closed {
		unix.Write(s.wake[1], []byte{1})
	}
}

// land places what a prefetch request brought, where it is still
// pending with the same source (faults may have delivered parts of it,
// and the process may have discarded or moved others meanwhile).
func (s *server) land(fl *flight) error {
	c := fl.c
	end := fl.va + uint64(len(fl.buf))
	for va := fl.va; va < end; {
		sp, ok := c.pend.find(va)
		if !ok || sp.src+(va-sp.start) != fl.src+(va-fl.va) {
			va += pageSize
			continue
		}
		e := min(sp.end, end)
		if err := s.place(c, va, fl.buf[va-fl.va:e-fl.va]); err != nil {
			return err
		}
		s.prefetched += int64(e - va)
		va = e
	}
	return nil
}

// drain waits for the prefetch requests in flight (their replies must be
// read before the stream says goodbye).
func (s *server) drain() {
	for _, fl := range s.flights {
		<-fl.f.Done()
	}
	s.flights = nil
}

// errAgain: retry after reading the pending events.
var errAgain = errors.New("address space changing")

func (s *server) fault(c *client, m uffd.Msg) error {
	s.stats.Faults++
	p := m.Address &^ (pageSize - 1)
	if sp, ok := c.pend.find(p); ok {
		t0 := time.Now()
		err := s.deliver(c, sp, p, faultChunk, true)
		if wait := time.Since(t0); wait > s.stats.FaultWaitMax {
			s.stats.FaultWaitMax = wait
		}
		if errors.Is(err, errAgain) {
			c.retry = append(c.retry, m)
			return nil
		} else if err != nil {
			return err
		}
		// Whatever happened to the range, the faulting thread must not
		// stay asleep: wake it (it faults again if the page is missing).
		if err := c.u.Wake(p, pageSize); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ESRCH) {
			return err
		}
		return nil
	}
	// Not in the images (never dumped, or discarded since): zero.
	err := c.u.ZeroPage(p, pageSize)
	if errors.Is(err, unix.EAGAIN) {
		c.retry = append(c.retry, m)
		return nil
	}
	if errors.Is(err, uffd.ErrExist) {
		return c.u.Wake(p, pageSize)
	}
	if err == nil {
		s.stats.PagesZero++
	}
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
		return nil
	}
	return err
}

// canPrefetch tells whether some client has pages to prefetch.
func (s *server) canPrefetch() bool {
	for _, c := range s.clients {
		if !c.unlisted && c.pend.pages() > 0 {
			return true
		}
	}
	return false
}

func (s *server) pendingPages() uint64 {
	var n uint64
	for _, c := range s.clients {
		n += c.pend.pages()
		if c.unlisted || c.confirm {
			// Not done before the source has listed it, even if faults
			// took every page: the list also says the source's dump
			// stands (the page server answers it only then).
			n++
		}
	}
	return n
}

// handle processes one message of client c.
func (s *server) handle(c *client, m uffd.Msg) error {
	switch m.Event {
	case uffd.EventPagefault:
		return s.fault(c, m)
	case uffd.EventRemove, uffd.EventUnmap:
		before := c.pend.pages()
		c.pend.remove(m.Start, m.End)
		s.stats.PagesDropped += before - c.pend.pages()
	case uffd.EventRemap:
		c.pend.move(m.From, m.To, m.Len)
		s.log.Info("a mapping moved during post-copy", "client", c.name, "from", fmt.Sprintf("%#x", m.From),
			"to", fmt.Sprintf("%#x", m.To), "bytes", m.Len)
	case uffd.EventFork:
		// The child's memory is the parent's: the same pages are missing.
		child := &client{u: uffd.AdoptNoHandshake(m.ChildFd, Features),
			pend: c.pend.clone(),
			name: "child of " + c.name, pid: c.pid, src: c.src, unlisted: c.unlisted, confirm: c.confirm}
		s.clients = append(s.clients, child)
		s.log.Info("serving a child forked during post-copy", "parent", c.name, "pages", child.pend.pages())
	}
	return nil
}

func (s *server) loop(ctx context.Context) error {
	buf := make([]byte, 64*uffd.MsgSize)
	start := time.Now()
	wait := 0 // poll timeout (ms): nonzero while prefetch is ahead of --prefetch-rate
	for s.pendingPages() > 0 || s.handovers > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := len(s.clients)
		pfd := make([]unix.PollFd, n, n+2)
		for i, c := range s.clients[:n] {
			pfd[i] = unix.PollFd{Fd: int32(c.u.Fd()), Events: unix.POLLIN}
		}
		pfd = append(pfd, unix.PollFd{Fd: int32(s.wake[0]), Events: unix.POLLIN})
		hold, _ := s.holding()
		listen := s.handovers > 0 || hold
		if listen {
			pfd = append(pfd, unix.PollFd{Fd: int32(s.lfd), Events: unix.POLLIN})
		}
		if !s.canPrefetch() {
			wait = 100 // wait for a fault, a handover, a list (or ctx)
		}
		if _, err := unix.Poll(pfd, wait); err != nil && !errors.Is(err, unix.EINTR) {
			return os.NewSyscallError("poll", err)
		}
		got := 0
		if pfd[n].Revents&unix.POLLIN != 0 {
			took, err := s.takeLists()
			if err != nil {
				return err
			}
			if took {
				got++
			}
		}
		if listen && pfd[n+1].Revents&unix.POLLIN != 0 {
			if err := s.accept(); err != nil {
				return err
			}
			got++
		}
		for i, c := range s.clients[:n] {
			if pfd[i].Revents&(unix.POLLERR|unix.POLLHUP) != 0 {
				continue
			}
			retry := c.retry
			c.retry = nil
			for _, m := range retry {
				s.stats.Faults--
				if err := s.fault(c, m); err != nil {
					return fmt.Errorf("%s: %w", c.name, err)
				}
			}
			got += len(retry)
			msgs, err := c.u.ReadMsgs(buf)
			if err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			got += len(msgs)
			for _, m := range msgs {
				if err := s.handle(c, m); err != nil {
					return fmt.Errorf("%s: %w", c.name, err)
				}
			}
		}
		var live []*client
		for i, c := range s.clients {
			// A process that exited (a container's "sleep 0.1" caught in
			// the dump) or whose address space is gone needs no more
			// pages: the others go on. It is no failure: its exit was
			// its own, and a failed delivery fails the daemon where it
			// happens.
			gone := i < n && pfd[i].Revents&(unix.POLLERR|unix.POLLHUP) != 0
			if c.main && !gone && unix.Kill(c.osPid, 0) != nil {
				gone = true
			}
			if gone {
				pending := c.pend.pages()
				s.stats.PagesDropped += pending
				s.log.Info("a process exited during post-copy: its pages are no longer needed",
					"client", c.name, "pending", pending)
				c.u.Close()
				continue
			}
			live = append(live, c)
		}
		s.clients = live
		wait = 0
		if got > 0 {
			continue
		}
		if s.rate > 0 && float64(s.prefetched) > float64(s.rate)*time.Since(start).Seconds() {
			wait = 5 // ahead of --prefetch-rate
			continue
		}
		if hold, left := s.holding(); hold {
			wait = int(min(100*time.Millisecond, left)/time.Millisecond) + 1
			continue
		}
		idle, err := s.prefetch()
		if err != nil {
			return err
		}
		if idle {
			wait = 100 // until a reply arrives (the wake pipe), or a fault
		}
	}
	s.drain()
	return nil
}

// mixed builds the source of a remote post-copy: pages this image set
// stores itself come from the page server, pages it inherits come from
// the parent images on this host when they are here.
func mixed(opts Options, pid int, entries []images.PageEntry, stats *Stats, chain *images.PageChain) (Source, [][2]uint64, error) {
	var own [][2]uint64
	for _, e := range entries {
		if !e.InParent {
			own = append(own, [2]uint64{e.Vaddr, e.End()})
		}
	}
	ranges := images.Ranges(entries)
	if len(own) == len(entries) {
		return opts.Remote, ranges, nil
	}
	parent, err := images.ParentDir(opts.ImagesDir)
	if err != nil {
		return nil, nil, err
	}
	var runs []images.PageRun
	if parent == "" {
		err = errors.New("they name no parent directory")
	} else {
		runs, err = chain.Resolve(parent, int32(pid))
	}
	if err != nil {
		if images.HasHoles(entries) {
			// Which pages the parent runs hold is only known from the
			// parent images.
			return nil, nil, fmt.Errorf("the images of process %d take pages from parent images that cannot be read here: %v", pid, err)
		}
		// The earlier rounds' pages are not on this host: fetch everything.
		return opts.Remote, ranges, nil
	}
	if images.HasHoles(entries) {
		ranges = images.Narrow(entries, runs, images.RunBounds)
	}
	ms := &mixedSource{local: localSource{runs}, remote: opts.Remote, isOwn: inRanges(own), stats: stats}
	return ms, ranges, nil
}

// Lazy reports whether a VMA's pages are served by the daemon: private
// anonymous memory (anonymous mappings, heap, stacks).
func Lazy(v *pb.Vma) bool {
	if v.Flags&unix.MAP_SHARED != 0 || v.UffdModes != 0 {
		return false // shared, or the process's own userfaultfd's
	}
	switch v.Kind {
	case "anon", "heap", "stack":
		return true
	}
	return false
}

// inUnlisted tells whether va is in one of vmas that Unlisted leaves out.
func inUnlisted(vmas []*pb.Vma, va uint64) bool {
	i := sort.Search(len(vmas), func(i int) bool { return vmas[i].End > va })
	return i < len(vmas) && vmas[i].Start <= va && Unlisted(vmas[i])
}

// Unlisted reports whether a dump that defers listing (PagemapHead
// unlisted) leaves a VMA's pages out of the pagemap: the lazy memory, but
// droppable mappings (not saved at all).
func Unlisted(v *pb.Vma) bool {
	return Lazy(v) && !slices.Contains(v.VmFlags, "dp")
}

// ListPresent lists the present (or swapped out) pages of the unlisted
// VMAs of process pid (here), in address order, with PAGEMAP_SCAN.
func ListPresent(pid int, vmas []*pb.Vma) ([][2]uint64, error) {
	sc, err := uffd.OpenScanner(pid)
	if err != nil {
		return nil, err
	}
	defer sc.Close()
	var out [][2]uint64
	q := uffd.Query{AnyOf: uffd.PagePresent | uffd.PageSwapped, ReturnMask: uffd.PagePresent | uffd.PageSwapped}
	for _, v := range vmas {
		if !Unlisted(v) {
			continue
		}
		rs, err := sc.Scan(v.Start, v.End, q)
		if err != nil {
			return nil, fmt.Errorf("listing the pages of %d at %#x-%#x: %w", pid, v.Start, v.End, err)
		}
		for _, r := range rs {
			if n := len(out); n > 0 && out[n-1][1] == r.Start {
				out[n-1][1] = r.End
			} else {
				out = append(out, [2]uint64{r.Start, r.End})
			}
		}
	}
	return out, nil
}

// Handover passes the userfaultfd of process pid (its PID in the images;
// osPid here) to the daemon listening at socket and waits for it to take
// over.
func Handover(socket string, pid, osPid, fd int) error {
	msg := make([]byte, len(magic)+8)
	copy(msg, magic)
	binary.LittleEndian.PutUint32(msg[len(magic):], uint32(pid))
	binary.LittleEndian.PutUint32(msg[len(magic)+4:], uint32(osPid))
	if err := ask(socket, msg, unix.UnixRights(fd), 30*time.Second); err != nil {
		return fmt.Errorf("hand over to the lazy-pages daemon: %w", err)
	}
	return nil
}

// ask sends the daemon at socket one message (with its descriptors in
// oob, if any) and waits up to wait for the answer: a zero byte, or the
// daemon's reason for refusing.
func ask(socket string, msg, oob []byte, wait time.Duration) error {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return fmt.Errorf("lazy-pages daemon at %s: %w", socket, err)
	}
	defer c.Close()
	// One write: the daemon takes the message in one read.
	n, _, err := c.WriteMsgUnix(msg, oob, nil)
	if err == nil && n < len(msg) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return fmt.Errorf("lazy-pages daemon at %s: %w", socket, err)
	}
	c.SetReadDeadline(time.Now().Add(wait))
	ack := make([]byte, 512)
	n, err = c.Read(ack)
	if err != nil {
		return fmt.Errorf("lazy-pages daemon: %w", err)
	}
	if n != 1 || ack[0] != 0 {
		return fmt.Errorf("lazy-pages daemon refused: %s", ack[:n])
	}
	return nil
}

// A restore's messages to the daemon.
const (
	msgHandover = iota // a process's userfaultfd
	msgFill            // pages to write in eagerly
	msgResumed         // the tree runs
)

// recvHandover reads a restore's message: a fill request (answered here),
// the word that the tree runs, or the handover of a userfaultfd.
func recvHandover(c *net.UnixConn, opts Options, log *slog.Logger) (pid, osPid, fd, kind int, err error) {
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return 0, 0, -1, 0, fmt.Errorf("lazy-pages: read handover: %w", err)
	}
	if string(buf[:n]) == resumedMagic {
		return 0, 0, -1, msgResumed, nil
	}
	if n >= len(fillMagic)+8 && string(buf[:len(fillMagic)]) == fillMagic {
		err := serveFill(c, buf[:n], opts)
		if err != nil {
			log.Error("lazy-pages: fill request failed", "err", err)
			c.Write([]byte(err.Error()))
			return 0, 0, -1, msgFill, nil
		}
		c.Write([]byte{0})
		return 0, 0, -1, msgFill, nil
	}
	if n != len(magic)+8 || string(buf[:len(magic)]) != magic {
		return 0, 0, -1, 0, fmt.Errorf("lazy-pages: bad handover message")
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return 0, 0, -1, 0, fmt.Errorf("lazy-pages: no userfaultfd in the handover")
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return 0, 0, -1, 0, fmt.Errorf("lazy-pages: no userfaultfd in the handover")
	}
	le := binary.LittleEndian
	return int(le.Uint32(buf[len(magic):])), int(le.Uint32(buf[len(magic)+4:])), fds[0], msgHandover, nil
}

const resumedMagic = "FERRYLZR"

// Resumed tells the daemon at socket that the restore has let the tree
// run: prefetch goes on at full speed from now on.
func Resumed(socket string) error {
	return ask(socket, []byte(resumedMagic), nil, 5*time.Second)
}

const fillMagic = "FERRYLZF"

// serveFill writes pages the restore needs filled eagerly (mappings
// userfaultfd cannot serve) into the process: pid u32 (in the images),
// its PID here u32, then (vaddr u64, len u64) pairs.
func serveFill(c *net.UnixConn, msg []byte, opts Options) error {
	if opts.Remote == nil {
		return errors.New("fill requests need --page-server (local pages are read by the restore itself)")
	}
	pid := int(binary.LittleEndian.Uint32(msg[len(fillMagic):]))
	osPid := int(binary.LittleEndian.Uint32(msg[len(fillMagic)+4:]))
	body := msg[len(fillMagic)+8:]
	buf := make([]byte, prefetchChunk)
	for ; len(body) >= 16; body = body[16:] {
		va, n := binary.LittleEndian.Uint64(body), binary.LittleEndian.Uint64(body[8:])
		for off := uint64(0); off < n; off += prefetchChunk {
			part := buf[:min(prefetchChunk, n-off)]
			if err := opts.Remote.Read(pid, va+off, part); err != nil {
				return err
			}
			if err := compel.WriteMem(osPid, []compel.Segment{{Addr: va + off, Local: part}}); err != nil {
				return err
			}
		}
	}
	return nil
}

// Fill asks the daemon at socket to write the given page ranges of pid
// (from its page source; osPid here) into the process, and waits until it
// has.
func Fill(socket string, pid, osPid int, ranges [][2]uint64) error {
	if len(ranges) == 0 {
		return nil
	}
	msg := make([]byte, len(fillMagic)+8, len(fillMagic)+8+16*len(ranges))
	copy(msg, fillMagic)
	binary.LittleEndian.PutUint32(msg[len(fillMagic):], uint32(pid))
	binary.LittleEndian.PutUint32(msg[len(fillMagic)+4:], uint32(osPid))
	for _, r := range ranges {
		msg = binary.LittleEndian.AppendUint64(msg, r[0])
		msg = binary.LittleEndian.AppendUint64(msg, r[1]-r[0])
	}
	if len(msg) > 64<<10 {
		return fmt.Errorf("fill request of %d ranges is too large", len(ranges))
	}
	return ask(socket, msg, nil, 5*time.Minute)
}

// Daemon is Serve running inside the restore's own process (the agent's
// post-copy, "restore --page-server"), on a socket of its own.
type Daemon struct {
	// Socket is where the daemon listens, for restorecore's LazySocket.
	Socket string
	// Stats and Err are what Serve returned (Err: the remote source's
	// Close error if Serve's was nil), set once Done is closed.
	Stats  *Stats
	Err    error
	cancel context.CancelFunc
	done   chan struct{}
}

// Start runs Serve(ctx, opts) in the background with its pages from
// remote, on a socket in a fresh temporary directory (a socket's path
// must fit sun_path; a state or images directory's may not). It sets
// opts.Socket, Remote and Ready. When Serve returns, remote is closed, or
// after a failure aborted, and release is called (release cancels
// remote's dial: an abort waits for the dial). Start returns once the
// socket listens.
func Start(ctx context.Context, opts Options, remote *Dialing, release func()) (*Daemon, error) {
	dir, err := os.MkdirTemp("", "ferry-lazy-")
	if err != nil {
		release()
		remote.Abort()
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	d := &Daemon{Socket: filepath.Join(dir, SocketName), cancel: cancel, done: make(chan struct{})}
	ready := make(chan struct{})
	opts.Socket, opts.Remote, opts.Ready = d.Socket, remote, func() { close(ready) }
	go func() {
		defer close(d.done)
		defer os.RemoveAll(dir)
		d.Stats, d.Err = Serve(ctx, opts)
		if d.Err == nil {
			d.Err = remote.Close()
			release()
		} else {
			release() // first: the abort waits for the dial
			remote.Abort()
		}
	}()
	select {
	case <-ready:
		return d, nil
	case <-d.done:
		return nil, d.Err
	}
}

// Done is closed once Serve returned.
func (d *Daemon) Done() <-chan struct{} { return d.done }

// Cancel cancels Serve (it kills the processes it serves that are not
// done).
func (d *Daemon) Cancel() { d.cancel() }

// Stop cancels Serve and waits for it.
func (d *Daemon) Stop() {
	d.cancel()
	<-d.done
}
