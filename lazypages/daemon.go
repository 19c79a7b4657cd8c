package lazypages

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/uffd"
)

// SocketName is the daemon's socket in the work directory, as criu names it.
const SocketName = "lazy-pages.socket"

const magic = "FERRYLZ1"

// Features a restore asks for on the userfaultfd it hands over.
const Features = uffd.FeatureEventRemap | uffd.FeatureEventRemove | uffd.FeatureEventUnmap

// Options configure the daemon.
type Options struct {
	ImagesDir string
	Socket    string
	// Ready is called once the socket listens (--status-fd).
	Ready  func()
	Logger *slog.Logger
}

// Stats describe a finished post-copy.
type Stats struct {
	Faults, PagesCopied, PagesZero, PagesDropped uint64
	Duration                                     time.Duration
}

// Serve waits for one restore to hand over a process and serves its
// memory until every page is delivered.
func Serve(ctx context.Context, opts Options) (*Stats, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	os.Remove(opts.Socket)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: opts.Socket, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("lazy-pages: listen: %w", err)
	}
	defer os.Remove(opts.Socket)
	defer l.Close()
	if opts.Ready != nil {
		opts.Ready()
	}
	go func() { <-ctx.Done(); l.Close() }()
	conn, err := l.AcceptUnix()
	if err != nil {
		return nil, fmt.Errorf("lazy-pages: accept: %w", err)
	}
	defer conn.Close()
	pid, fd, err := recvHandover(conn)
	if err != nil {
		return nil, err
	}
	u := uffd.AdoptNoHandshake(fd, Features)
	defer u.Close()
	var chain images.PageChain
	defer chain.Close()
	runs, err := chain.Resolve(opts.ImagesDir, int32(pid))
	if err != nil {
		conn.Write([]byte(err.Error()))
		return nil, err
	}
	mm := &pb.MmCore{}
	if err := images.ReadOne(opts.ImagesDir, fmt.Sprintf("mm-%d.img", pid), images.KindMm, mm); err != nil {
		conn.Write([]byte(err.Error()))
		return nil, err
	}
	s := &server{u: u, pid: pid, runs: runs, log: log}
	// Pending: the image's pages inside lazy VMAs, split at VMA bounds
	// (UFFDIO_COPY must stay within one VMA).
	for _, v := range mm.Vmas {
		if !Lazy(v) {
			continue
		}
		for _, r := range runs {
			a, b := max(v.Start, r.Vaddr), min(v.End, r.Vaddr+uint64(len(r.Data)))
			if a < b {
				s.pend.spans = append(s.pend.spans, pendSpan{a, b, a})
			}
		}
	}
	sort.Slice(s.pend.spans, func(i, j int) bool { return s.pend.spans[i].start < s.pend.spans[j].start })
	if _, err := conn.Write([]byte{0}); err != nil {
		return nil, err
	}
	log.Info("serving lazy pages", "pid", pid, "pages", s.pend.pages())
	start := time.Now()
	err = s.loop(ctx)
	s.stats.Duration = time.Since(start)
	log.Info("lazy pages done", "pid", pid, "faults", s.stats.Faults, "copied", s.stats.PagesCopied,
		"zero", s.stats.PagesZero, "dropped", s.stats.PagesDropped, "took", s.stats.Duration)
	return &s.stats, err
}

type server struct {
	u     *uffd.FD
	pid   int
	runs  []images.PageRun
	pend  pending
	log   *slog.Logger
	stats Stats
}

// data returns the image bytes for pages [src, src+n), clipped to one run.
func (s *server) data(src, n uint64) []byte {
	i := sort.Search(len(s.runs), func(i int) bool { return s.runs[i].Vaddr+uint64(len(s.runs[i].Data)) > src })
	if i == len(s.runs) || s.runs[i].Vaddr > src {
		return nil
	}
	r := s.runs[i]
	off := src - r.Vaddr
	return r.Data[off:min(uint64(len(r.Data)), off+n)]
}

const (
	faultChunk    = 64 << 10
	prefetchChunk = 1 << 20
)

// deliver copies up to n bytes of pending span sp starting at va.
func (s *server) deliver(sp pendSpan, va, n uint64) error {
	n = min(n, sp.end-va)
	src := s.data(sp.src+(va-sp.start), n)
	if len(src) == 0 {
		return fmt.Errorf("no image data for pending page %#x", va)
	}
	done, err := s.u.Copy(va, src, false)
	switch {
	case err == nil:
	case errors.Is(err, uffd.ErrExist):
		// Some page is there already (a racing fault or event): copy the
		// rest page by page.
		for off := uint64(done) &^ (pageSize - 1); off < uint64(len(src)); off += pageSize {
			if _, err := s.u.Copy(va+off, src[off:off+pageSize], false); err != nil && !errors.Is(err, uffd.ErrExist) {
				return err
			}
		}
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ESRCH):
		// The range is gone (unmapped meanwhile): an event will follow.
	default:
		return err
	}
	s.pend.remove(va, va+uint64(len(src)))
	s.stats.PagesCopied += uint64(len(src)) / pageSize
	return nil
}

func (s *server) fault(m uffd.Msg) error {
	s.stats.Faults++
	p := m.Address &^ (pageSize - 1)
	if sp, ok := s.pend.find(p); ok {
		if err := s.deliver(sp, p, faultChunk); err != nil {
			return err
		}
		// Whatever happened to the range, the faulting thread must not
		// stay asleep: wake it (it faults again if the page is missing).
		if err := s.u.Wake(p, pageSize); err != nil && !errors.Is(err, unix.ENOENT) {
			return err
		}
		return nil
	}
	// Not in the images (never dumped, or discarded since): zero.
	err := s.u.ZeroPage(p, pageSize)
	if errors.Is(err, uffd.ErrExist) {
		return s.u.Wake(p, pageSize)
	}
	if err == nil {
		s.stats.PagesZero++
	}
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	return err
}

func (s *server) loop(ctx context.Context) error {
	buf := make([]byte, 64*uffd.MsgSize)
	pfd := []unix.PollFd{{Fd: int32(s.u.Fd()), Events: unix.POLLIN}}
	for !s.pend.empty() {
		if err := ctx.Err(); err != nil {
			return err
		}
		timeout := 0 // prefetch when idle
		n, err := unix.Poll(pfd, timeout)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return os.NewSyscallError("poll", err)
		}
		if n > 0 && pfd[0].Revents&(unix.POLLERR|unix.POLLHUP) != 0 {
			return fmt.Errorf("process %d: userfaultfd closed", s.pid)
		}
		msgs, err := s.u.ReadMsgs(buf)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			switch m.Event {
			case uffd.EventPagefault:
				err = s.fault(m)
			case uffd.EventRemove, uffd.EventUnmap:
				before := s.pend.pages()
				s.pend.remove(m.Start, m.End)
				s.stats.PagesDropped += before - s.pend.pages()
			case uffd.EventRemap:
				s.pend.move(m.From, m.To, m.Len)
			case uffd.EventFork:
				unix.Close(m.ChildFd)
				err = fmt.Errorf("process %d forked during post-copy: not supported yet", s.pid)
			}
			if err != nil {
				return err
			}
		}
		if len(msgs) == 0 && !s.pend.empty() {
			sp := s.pend.spans[0]
			if err := s.deliver(sp, sp.start, prefetchChunk); err != nil {
				return err
			}
		}
		if unix.Kill(s.pid, 0) != nil {
			return fmt.Errorf("process %d exited during post-copy", s.pid)
		}
	}
	return nil
}

// Lazy reports whether a VMA's pages are served by the daemon: private
// anonymous memory (anonymous mappings, heap, stacks).
func Lazy(v *pb.Vma) bool {
	if v.Flags&unix.MAP_SHARED != 0 {
		return false
	}
	switch v.Kind {
	case "anon", "heap", "stack":
		return true
	}
	return false
}

// Handover passes the userfaultfd of process pid to the daemon listening
// at socket and waits for it to take over.
func Handover(socket string, pid, fd int) error {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return fmt.Errorf("lazy-pages daemon at %s: %w", socket, err)
	}
	defer c.Close()
	msg := make([]byte, len(magic)+4)
	copy(msg, magic)
	binary.LittleEndian.PutUint32(msg[len(magic):], uint32(pid))
	if _, _, err := c.WriteMsgUnix(msg, unix.UnixRights(fd), nil); err != nil {
		return fmt.Errorf("hand over to the lazy-pages daemon: %w", err)
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	ack := make([]byte, 512)
	n, err := c.Read(ack)
	if err != nil {
		return fmt.Errorf("lazy-pages daemon: %w", err)
	}
	if n != 1 || ack[0] != 0 {
		return fmt.Errorf("lazy-pages daemon refused: %s", ack[:n])
	}
	return nil
}

func recvHandover(c *net.UnixConn) (pid, fd int, err error) {
	buf := make([]byte, len(magic)+4)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return 0, -1, fmt.Errorf("lazy-pages: read handover: %w", err)
	}
	if n != len(buf) || string(buf[:len(magic)]) != magic {
		return 0, -1, fmt.Errorf("lazy-pages: bad handover message")
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return 0, -1, fmt.Errorf("lazy-pages: no userfaultfd in the handover")
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return 0, -1, fmt.Errorf("lazy-pages: no userfaultfd in the handover")
	}
	return int(binary.LittleEndian.Uint32(buf[len(magic):])), fds[0], nil
}
