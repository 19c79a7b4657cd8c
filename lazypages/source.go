package lazypages

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/pageserver"
	"github.com/ferrycr/ferry/transport"
)

// Source supplies page data to the daemon.
type Source interface {
	// Read fills buf with the pages of process pid at vaddr as dumped.
	Read(pid int, vaddr uint64, buf []byte) error
}

// localSource reads resolved image runs.
type localSource struct{ runs []images.PageRun }

// index returns the first run ending after va.
func (l localSource) index(va uint64) int {
	return sort.Search(len(l.runs), func(i int) bool { return l.runs[i].Vaddr+uint64(len(l.runs[i].Data)) > va })
}

func (l localSource) Read(_ int, vaddr uint64, buf []byte) error {
	runs := l.runs
	i := l.index(vaddr)
	for done := 0; done < len(buf); i++ {
		va := vaddr + uint64(done)
		if i == len(runs) || runs[i].Vaddr > va {
			return fmt.Errorf("no image data for %#x", va)
		}
		done += copy(buf[done:], runs[i].Data[va-runs[i].Vaddr:])
	}
	return nil
}

// has tells whether the runs hold the page at va.
func (l localSource) has(va uint64) bool {
	i := l.index(va)
	return i < len(l.runs) && l.runs[i].Vaddr <= va
}

// Lazy-mode page stream frames (transport), both directions.
const (
	frameReq   = 10 // pid u32, vaddr u64, len u32
	framePages = 11 // vaddr u64, then the bytes
	frameErr   = 12 // message
	frameBye   = 13
	// frameList asks for the pages of pid's unlisted memory (pid u32);
	// frameRanges answers, possibly in several frames: pid u32, last u8,
	// then (start u64, end u64) pairs; frameListErr fails it: pid u32,
	// then the message. Page requests are served meanwhile: listing a
	// large process takes a while.
	frameList    = 14
	frameRanges  = 15
	frameListErr = 16
)

// Lister is a Source that can list the pages of a process's unlisted
// memory (PagemapHead.unlisted): its page server reads them from the
// frozen process once the restore has begun.
type Lister interface {
	List(pid int) ([][2]uint64, error)
}

// RemoteSource asks a page server in lazy mode (ferry page-server
// --lazy-pages, or dump --lazy-pages) for pages over a transport stream.
// Page requests may be many in flight (Request): the server answers them
// in order, so the daemon's next chunk is on its way while it copies the
// last. One goroutine reads the stream: page replies go to the oldest
// request, lists to whoever asked for them.
type RemoteSource struct {
	wmu    sync.Mutex // frame writes, and the queue's order with them
	s      *transport.Stream
	closed chan struct{}
	once   sync.Once

	mu     sync.Mutex
	queue  []*Flight // page requests sent, oldest first
	lists  map[int]*pendingList
	failed error // the reader failed: no request or list is taken any more

	// faults, once connected, is a second stream to the same server for
	// the pages faults wait for (ReadUrgent): on this one they would
	// queue behind megabytes of prefetched pages.
	faults atomic.Pointer[RemoteSource]
}

// Flight is a page request in flight (RemoteSource.Request).
type Flight struct {
	vaddr  uint64
	buf    []byte
	notify func()
	done   chan struct{}
	err    error
}

// Done is closed once the request is answered (or failed).
func (f *Flight) Done() <-chan struct{} { return f.done }

// Err is the request's outcome, once Done.
func (f *Flight) Err() error { return f.err }

func (f *Flight) finish(err error) {
	f.err = err
	close(f.done)
	if f.notify != nil {
		f.notify()
	}
}

type pendingList struct {
	ranges [][2]uint64
	done   chan struct{}
	err    error
}

// NewRemoteSource uses an established stream.
func NewRemoteSource(s *transport.Stream) *RemoteSource {
	r := &RemoteSource{s: s, closed: make(chan struct{}), lists: map[int]*pendingList{}}
	go r.read()
	return r
}

// read dispatches the frames of the stream until it fails or closes.
func (r *RemoteSource) read() {
	var buf []byte
	fail := func(err error) {
		r.mu.Lock()
		q, lists := r.queue, r.lists
		r.queue, r.lists, r.failed = nil, nil, err
		r.mu.Unlock()
		for _, f := range q {
			f.finish(err)
		}
		for _, l := range lists {
			l.err = err
			close(l.done)
		}
	}
	for {
		typ, n, err := r.s.ReadHead()
		var direct *Flight // the request a reply was read for
		if err == nil {
			direct, err = r.direct(typ, n)
			if direct != nil && err == nil {
				direct.finish(nil)
				continue
			}
		}
		var p []byte
		if err == nil && direct == nil {
			if cap(buf) < n {
				buf = make([]byte, n)
			}
			p = buf[:n]
			err = r.s.ReadBody(p)
		}
		if err != nil {
			select {
			case <-r.closed:
				err = errors.New("page server: stream closed")
			default:
				err = fmt.Errorf("page server: %w", err)
			}
			if direct != nil {
				direct.finish(err)
			}
			fail(err)
			return
		}
		if typ == frameRanges || typ == frameListErr {
			if err := r.gotList(typ, p); err != nil {
				fail(err)
				return
			}
			continue
		}
		r.mu.Lock()
		var f *Flight
		if len(r.queue) > 0 {
			f, r.queue = r.queue[0], r.queue[1:]
		}
		r.mu.Unlock()
		switch {
		case f == nil:
			fail(fmt.Errorf("page server: a reply (frame %d) to no request", typ))
			return
		case typ == frameErr:
			f.finish(fmt.Errorf("page server: %s", p))
		default:
			err := fmt.Errorf("page server: unexpected reply to %#x+%d", f.vaddr, len(f.buf))
			f.finish(err)
			fail(err)
			return
		}
	}
}

// direct reads a reply of pages that has the size the oldest request
// asked for straight into that request's buffer, and returns the request
// (nil, having read nothing, for any other frame).
func (r *RemoteSource) direct(typ uint8, n int) (*Flight, error) {
	if typ != framePages {
		return nil, nil
	}
	r.mu.Lock()
	var f *Flight
	if len(r.queue) > 0 && n == 8+len(r.queue[0].buf) {
		f, r.queue = r.queue[0], r.queue[1:]
	}
	r.mu.Unlock()
	if f == nil {
		return nil, nil
	}
	var va [8]byte
	if err := r.s.ReadBody(va[:]); err != nil {
		return f, err
	}
	if got := binary.LittleEndian.Uint64(va[:]); got != f.vaddr {
		return f, fmt.Errorf("a reply for %#x to a request for %#x", got, f.vaddr)
	}
	return f, r.s.ReadBody(f.buf)
}

func (r *RemoteSource) gotList(typ uint8, p []byte) error {
	if len(p) < 4 {
		return errors.New("page server: short list frame")
	}
	pid := int(binary.LittleEndian.Uint32(p))
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.lists[pid]
	if l == nil {
		return fmt.Errorf("page server: a list of process %d nobody asked for", pid)
	}
	if typ == frameListErr {
		l.err = fmt.Errorf("page server: listing the pages of process %d: %s", pid, p[4:])
		delete(r.lists, pid)
		close(l.done)
		return nil
	}
	if len(p) < 5 || (len(p)-5)%16 != 0 {
		return errors.New("page server: bad list frame")
	}
	for b := p[5:]; len(b) > 0; b = b[16:] {
		l.ranges = append(l.ranges, [2]uint64{binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint64(b[8:])})
	}
	if p[4] != 0 {
		delete(r.lists, pid)
		close(l.done)
	}
	return nil
}

// DialRemote connects to the page server in lazy mode at addr over network
// ("tcp" or "quic"), asking for zstd if wantZstd.
func DialRemote(ctx context.Context, network, addr string, t transport.TLS, wantZstd bool) (*RemoteSource, error) {
	dial := func() (*transport.Stream, error) { return pageserver.Dial(ctx, network, addr, t, wantZstd) }
	s, err := dial()
	if err != nil {
		return nil, err
	}
	r := NewRemoteSource(s)
	if s.Faults {
		// The stream for faults is set up in the background: until it
		// is, faults go on the first.
		go func() {
			fs, err := dial()
			if err != nil {
				return
			}
			f := NewRemoteSource(fs)
			r.faults.Store(f)
			select {
			case <-r.closed: // closed meanwhile: Close or Abort missed it
				f.Abort()
			default:
			}
		}()
	}
	return r, nil
}

// ReadUrgent is Read for the pages a fault waits for: on the server's
// stream for faults once it is up, ahead of the prefetches queued on this
// one.
func (r *RemoteSource) ReadUrgent(pid int, vaddr uint64, buf []byte) error {
	if f := r.faults.Load(); f != nil {
		return f.Read(pid, vaddr, buf)
	}
	return r.Read(pid, vaddr, buf)
}

// Dialing is a RemoteSource still connecting (DialAsync): a post-copy
// restore starts while the TLS handshake with the source goes on, and the
// first request waits for it.
type Dialing struct {
	done chan struct{}
	r    *RemoteSource
	err  error
}

// DialAsync is DialRemote in the background.
func DialAsync(ctx context.Context, network, addr string, t transport.TLS, wantZstd bool) *Dialing {
	d := &Dialing{done: make(chan struct{})}
	go func() {
		defer close(d.done)
		d.r, d.err = DialRemote(ctx, network, addr, t, wantZstd)
	}()
	return d
}

// Wait returns the connected source, or why there is none.
func (d *Dialing) Wait() (*RemoteSource, error) {
	<-d.done
	return d.r, d.err
}

func (d *Dialing) Read(pid int, vaddr uint64, buf []byte) error {
	r, err := d.Wait()
	if err != nil {
		return err
	}
	return r.Read(pid, vaddr, buf)
}

// ReadUrgent is RemoteSource.ReadUrgent once connected.
func (d *Dialing) ReadUrgent(pid int, vaddr uint64, buf []byte) error {
	r, err := d.Wait()
	if err != nil {
		return err
	}
	return r.ReadUrgent(pid, vaddr, buf)
}

// urgentReader is a Source that can fetch the pages a fault waits for
// ahead of the requests it has queued (RemoteSource).
type urgentReader interface {
	ReadUrgent(pid int, vaddr uint64, buf []byte) error
}

// readUrgent reads from src, urgently if it can.
func readUrgent(src Source, pid int, vaddr uint64, buf []byte) error {
	if u, ok := src.(urgentReader); ok {
		return u.ReadUrgent(pid, vaddr, buf)
	}
	return src.Read(pid, vaddr, buf)
}

func (d *Dialing) List(pid int) ([][2]uint64, error) {
	r, err := d.Wait()
	if err != nil {
		return nil, err
	}
	return r.List(pid)
}

// Request is RemoteSource.Request once connected.
func (d *Dialing) Request(pid int, vaddr uint64, buf []byte, notify func()) *Flight {
	r, err := d.Wait()
	if err != nil {
		return finished(err, notify)
	}
	return r.Request(pid, vaddr, buf, notify)
}

// finished returns a Flight that is over already.
func finished(err error, notify func()) *Flight {
	f := &Flight{notify: notify, done: make(chan struct{})}
	f.finish(err)
	return f
}

// Close ends the stream as RemoteSource.Close does (the dial's error if
// it failed).
func (d *Dialing) Close() error {
	r, err := d.Wait()
	if err != nil {
		return err
	}
	return r.Close()
}

// Abort drops the stream, once the dial is over.
func (d *Dialing) Abort() {
	if r, err := d.Wait(); err == nil {
		r.Abort()
	}
}

func (r *RemoteSource) send(typ uint8, p []byte) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	return r.write(typ, p)
}

func (r *RemoteSource) write(typ uint8, p []byte) error {
	if err := r.s.WriteFrame(typ, p); err != nil {
		return err
	}
	return r.s.Flush()
}

// Request asks for the pages of process pid at vaddr, len(buf) bytes, and
// returns at once; the reply fills buf, then notify (if set) is called.
func (r *RemoteSource) Request(pid int, vaddr uint64, buf []byte, notify func()) *Flight {
	f := &Flight{vaddr: vaddr, buf: buf, notify: notify, done: make(chan struct{})}
	req := make([]byte, 16)
	binary.LittleEndian.PutUint32(req[0:], uint32(pid))
	binary.LittleEndian.PutUint64(req[4:], vaddr)
	binary.LittleEndian.PutUint32(req[12:], uint32(len(buf)))
	r.wmu.Lock()
	r.mu.Lock()
	if err := r.failed; err != nil {
		r.mu.Unlock()
		r.wmu.Unlock()
		f.finish(err)
		return f
	}
	r.queue = append(r.queue, f)
	r.mu.Unlock()
	err := r.write(frameReq, req)
	mine := false
	if err != nil {
		// Never sent: no reply will come. f is the last request (the
		// writes are held), unless the reader failed them all meanwhile.
		r.mu.Lock()
		if n := len(r.queue); n > 0 && r.queue[n-1] == f {
			r.queue, mine = r.queue[:n-1], true
		}
		r.mu.Unlock()
	}
	r.wmu.Unlock()
	if mine {
		f.finish(fmt.Errorf("page server: %w", err))
	}
	return f
}

// Read requests pages and waits for them.
func (r *RemoteSource) Read(pid int, vaddr uint64, buf []byte) error {
	f := r.Request(pid, vaddr, buf, nil)
	<-f.done
	return f.err
}

// List asks the page server for the pages of pid's unlisted memory and
// waits for them (page requests go on meanwhile).
func (r *RemoteSource) List(pid int) ([][2]uint64, error) {
	l := &pendingList{done: make(chan struct{})}
	r.mu.Lock()
	if err := r.failed; err != nil {
		r.mu.Unlock()
		return nil, err
	}
	if r.lists[pid] != nil {
		r.mu.Unlock()
		return nil, fmt.Errorf("the pages of process %d are being listed already", pid)
	}
	r.lists[pid] = l
	r.mu.Unlock()
	req := binary.LittleEndian.AppendUint32(nil, uint32(pid))
	if err := r.send(frameList, req); err != nil {
		return nil, err
	}
	<-l.done // the reply, or the reader failing
	return l.ranges, l.err
}

// Abort drops the connection without telling the server the daemon is
// done (a failed post-copy).
func (r *RemoteSource) Abort() {
	r.once.Do(func() { close(r.closed) })
	if f := r.faults.Load(); f != nil {
		f.Abort()
	}
	r.s.Close()
}

// Close tells the server the daemon is done.
func (r *RemoteSource) Close() error {
	if f := r.faults.Load(); f != nil {
		f.Close()
	}
	r.send(frameBye, nil)
	r.once.Do(func() { close(r.closed) })
	return r.s.Close()
}

// ServePages answers a lazy-pages daemon's requests until it says goodbye
// (page-server --lazy-pages, dump --lazy-pages): pages from read, and the
// pages of unlisted memory from list, which runs aside while pages are
// served (nil: nothing is unlisted).
//
// Replies go out in the order of the requests, from a goroutine of their
// own: the next request's pages are read while the last one's are
// compressed, encrypted and sent (one after the other, a 1 GiB post-copy
// took a third longer).
func ServePages(s *transport.Stream, read func(pid int, vaddr uint64, buf []byte) error, list func(pid int) ([][2]uint64, error)) error {
	var wmu sync.Mutex
	write := func(typ uint8, p []byte) error {
		wmu.Lock()
		defer wmu.Unlock()
		if err := s.WriteFrame(typ, p); err != nil {
			return err
		}
		return s.Flush()
	}
	var listing sync.WaitGroup
	defer listing.Wait()
	type reply struct {
		typ uint8
		p   []byte
	}
	const depth = 4 // replies read ahead of the one being sent
	out := make(chan reply, depth)
	free := make(chan []byte, depth)
	for range depth {
		free <- nil
	}
	sent := make(chan error, 1)
	go func() {
		var err error
		for r := range out {
			if err == nil {
				wmu.Lock()
				err = s.WriteFrame(r.typ, r.p)
				if err == nil && len(out) == 0 {
					err = s.Flush() // nothing more ready: the daemon waits
				}
				wmu.Unlock()
			}
			free <- r.p
		}
		sent <- err
	}()
	finish := func(err error) error {
		close(out)
		if werr := <-sent; err == nil && werr != nil {
			err = fmt.Errorf("lazy page stream: %w", werr)
		}
		return err
	}
	var in []byte
	for {
		typ, p, err := s.ReadFrame(in)
		if err != nil {
			return finish(fmt.Errorf("lazy page stream: %w", err))
		}
		in = p
		switch typ {
		case frameBye:
			return finish(nil)
		case frameList:
			if len(p) != 4 {
				return finish(fmt.Errorf("lazy page stream: bad list request"))
			}
			pid := binary.LittleEndian.Uint32(p)
			listing.Add(1)
			go func() {
				defer listing.Done()
				sendList(write, pid, list)
			}()
		case frameReq:
			if len(p) != 16 {
				return finish(fmt.Errorf("lazy page stream: bad request"))
			}
			pid := int(binary.LittleEndian.Uint32(p))
			vaddr := binary.LittleEndian.Uint64(p[4:])
			n := int(binary.LittleEndian.Uint32(p[12:]))
			if n <= 0 || n > transport.MaxFrame-8 || n%pageSize != 0 {
				return finish(fmt.Errorf("lazy page stream: bad request length %d", n))
			}
			buf := <-free
			if cap(buf) < 8+n {
				buf = make([]byte, 8+n)
			}
			buf = buf[:8+n]
			binary.LittleEndian.PutUint64(buf, vaddr)
			if err := read(pid, vaddr, buf[8:]); err != nil {
				out <- reply{frameErr, append(buf[:0], err.Error()...)}
			} else {
				out <- reply{framePages, buf}
			}
		default:
			return finish(fmt.Errorf("lazy page stream: unknown frame %d", typ))
		}
	}
}

// ServeSession serves a lazy-pages daemon on l: the stream it opens first
// and, beside it, the one it may open for its faults
// (transport.FlagFaults), until it says goodbye on the first or ctx ends.
// read must take calls from both at once.
func ServeSession(ctx context.Context, l net.Listener, log *slog.Logger, read func(pid int, vaddr uint64, buf []byte) error, list func(pid int) ([][2]uint64, error)) error {
	s, err := pageserver.Accept(ctx, l, log)
	if err != nil {
		return err
	}
	defer s.Close()
	defer context.AfterFunc(ctx, func() { s.Close() })()
	fctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		f, err := pageserver.Accept(fctx, l, log)
		if err != nil {
			return // the session ended first, or no second stream came
		}
		defer f.Close()
		defer context.AfterFunc(fctx, func() { f.Close() })()
		ServePages(f, read, nil)
	}()
	err = ServePages(s, read, list)
	cancel()
	wg.Wait()
	return err
}

// sendList answers a frameList for pid, in frames of at most MaxFrame.
func sendList(write func(uint8, []byte) error, pid uint32, list func(int) ([][2]uint64, error)) {
	head := binary.LittleEndian.AppendUint32(nil, pid)
	if list == nil {
		write(frameListErr, append(head, "this page server lists no pages"...))
		return
	}
	ranges, err := list(int(pid))
	if err != nil {
		write(frameListErr, append(head, err.Error()...))
		return
	}
	const per = (transport.MaxFrame - 5) / 16
	for {
		n := min(len(ranges), per)
		last := byte(0)
		if n == len(ranges) {
			last = 1
		}
		f := make([]byte, 0, 5+16*n)
		f = append(append(f, head...), last)
		for _, r := range ranges[:n] {
			f = binary.LittleEndian.AppendUint64(f, r[0])
			f = binary.LittleEndian.AppendUint64(f, r[1])
		}
		if write(frameRanges, f) != nil || last == 1 {
			return
		}
		ranges = ranges[n:]
	}
}

// ImageReader serves page data from an image directory (for ServePages).
func ImageReader(dir string) (read func(pid int, vaddr uint64, buf []byte) error, closer func()) {
	chains := map[int]localSource{}
	var all []*images.PageChain
	var mu sync.Mutex // the daemon's two streams read at once
	read = func(pid int, vaddr uint64, buf []byte) error {
		mu.Lock()
		src, ok := chains[pid]
		if !ok {
			c := &images.PageChain{}
			runs, err := c.Resolve(dir, int32(pid))
			if err != nil {
				mu.Unlock()
				return err
			}
			all = append(all, c)
			src = localSource{runs}
			chains[pid] = src
		}
		mu.Unlock()
		return src.Read(pid, vaddr, buf)
	}
	return read, func() {
		for _, c := range all {
			c.Close()
		}
	}
}

// mixedSource serves the pages a target already holds from earlier rounds
// (the parent image chain, local) from disk, and only the rest from the
// remote page server: pages sent by pre-dump rounds are not sent again.
//
// It also serves a post-copy whose lazy memory the images leave unlisted
// but for its hot pages (dumpcore's hotPages): those from disk, the rest
// from the remote, which lists it too.
type mixedSource struct {
	local  localSource
	remote Source
	// isOwn tells the pages only the remote has.
	isOwn func(va uint64) bool
	stats *Stats
}

// inRanges tells whether va is in one of the sorted, disjoint ranges.
func inRanges(ranges [][2]uint64) func(va uint64) bool {
	return func(va uint64) bool {
		i := sort.Search(len(ranges), func(i int) bool { return ranges[i][1] > va })
		return i < len(ranges) && ranges[i][0] <= va
	}
}

// Request sends a request ahead for pages only the remote has (when it
// takes requests ahead); others are read at once.
func (m *mixedSource) Request(pid int, vaddr uint64, buf []byte, notify func()) *Flight {
	rq, ok := m.remote.(requester)
	for va := vaddr; ok && va < vaddr+uint64(len(buf)); va += pageSize {
		ok = m.isOwn(va)
	}
	if ok {
		m.stats.RemotePages += uint64(len(buf)) / pageSize
		return rq.Request(pid, vaddr, buf, notify)
	}
	return finished(m.Read(pid, vaddr, buf), notify)
}

// List lists the remote's unlisted memory.
func (m *mixedSource) List(pid int) ([][2]uint64, error) {
	l, ok := m.remote.(Lister)
	if !ok {
		return nil, errors.New("the page server cannot list memory")
	}
	return l.List(pid)
}

func (m *mixedSource) Read(pid int, vaddr uint64, buf []byte) error {
	return m.read(pid, vaddr, buf, m.remote.Read)
}

// ReadUrgent is Read for a fault: its remote part is fetched urgently.
func (m *mixedSource) ReadUrgent(pid int, vaddr uint64, buf []byte) error {
	return m.read(pid, vaddr, buf, func(pid int, vaddr uint64, buf []byte) error { return readUrgent(m.remote, pid, vaddr, buf) })
}

func (m *mixedSource) read(pid int, vaddr uint64, buf []byte, remote func(pid int, vaddr uint64, buf []byte) error) error {
	// Split buf into runs of the same origin.
	for start := 0; start < len(buf); {
		own := m.isOwn(vaddr + uint64(start))
		end := start + pageSize
		for end < len(buf) && m.isOwn(vaddr+uint64(end)) == own {
			end += pageSize
		}
		var err error
		if own {
			err = remote(pid, vaddr+uint64(start), buf[start:end])
			m.stats.RemotePages += uint64(end-start) / pageSize
		} else {
			err = m.local.Read(pid, vaddr+uint64(start), buf[start:end])
			m.stats.LocalPages += uint64(end-start) / pageSize
		}
		if err != nil {
			return err
		}
		start = end
	}
	return nil
}
