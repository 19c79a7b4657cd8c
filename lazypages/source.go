package lazypages

import (
	"context"
	"encoding/binary"
	"fmt"
	"sort"
	"sync"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/transport"
)

// Source supplies page data to the daemon.
type Source interface {
	// Read fills buf with the pages of process pid at vaddr as dumped.
	Read(pid int, vaddr uint64, buf []byte) error
}

// localSource reads resolved image runs.
type localSource struct{ runs []images.PageRun }

func (l localSource) Read(_ int, vaddr uint64, buf []byte) error {
	runs := l.runs
	i := sort.Search(len(runs), func(i int) bool { return runs[i].Vaddr+uint64(len(runs[i].Data)) > vaddr })
	for done := 0; done < len(buf); i++ {
		va := vaddr + uint64(done)
		if i == len(runs) || runs[i].Vaddr > va {
			return fmt.Errorf("no image data for %#x", va)
		}
		done += copy(buf[done:], runs[i].Data[va-runs[i].Vaddr:])
	}
	return nil
}

// Lazy-mode page stream frames (transport), both directions.
const (
	frameReq   = 10 // pid u32, vaddr u64, len u32
	framePages = 11 // vaddr u64, then the bytes
	frameErr   = 12 // message
	frameBye   = 13
)

// RemoteSource asks a page server in lazy mode (ferry page-server
// --lazy-pages, or dump --lazy-pages) for pages over a transport stream.
type RemoteSource struct {
	mu  sync.Mutex
	s   *transport.Stream
	buf []byte
}

// NewRemoteSource uses an established stream.
func NewRemoteSource(s *transport.Stream) *RemoteSource { return &RemoteSource{s: s} }

// DialRemote connects to the page server in lazy mode at addr over network
// ("tcp" or "quic"), asking for zstd if wantZstd.
func DialRemote(ctx context.Context, network, addr string, t transport.TLS, wantZstd bool) (*RemoteSource, error) {
	conn, err := transport.DialOn(ctx, network, addr, t)
	if err != nil {
		return nil, fmt.Errorf("page server %s: %w", addr, err)
	}
	s, err := transport.Client(conn, wantZstd)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("page server %s: %w", addr, err)
	}
	return NewRemoteSource(s), nil
}

// Read requests pages and waits for them.
func (r *RemoteSource) Read(pid int, vaddr uint64, buf []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	req := make([]byte, 16)
	binary.LittleEndian.PutUint32(req[0:], uint32(pid))
	binary.LittleEndian.PutUint64(req[4:], vaddr)
	binary.LittleEndian.PutUint32(req[12:], uint32(len(buf)))
	if err := r.s.WriteFrame(frameReq, req); err != nil {
		return err
	}
	if err := r.s.Flush(); err != nil {
		return err
	}
	typ, p, err := r.s.ReadFrame(r.buf)
	if err != nil {
		return fmt.Errorf("page server: %w", err)
	}
	r.buf = p
	switch {
	case typ == frameErr:
		return fmt.Errorf("page server: %s", p)
	case typ != framePages || len(p) != 8+len(buf) || binary.LittleEndian.Uint64(p) != vaddr:
		return fmt.Errorf("page server: unexpected reply to %#x+%d", vaddr, len(buf))
	}
	copy(buf, p[8:])
	return nil
}

// Abort drops the connection without telling the server the daemon is
// done (a failed post-copy).
func (r *RemoteSource) Abort() { r.s.Close() }

// Close tells the server the daemon is done.
func (r *RemoteSource) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.s.WriteFrame(frameBye, nil)
	r.s.Flush()
	return r.s.Close()
}

// ServePages answers a lazy-pages daemon's requests from read until it
// says goodbye (page-server --lazy-pages, dump --lazy-pages).
func ServePages(s *transport.Stream, read func(pid int, vaddr uint64, buf []byte) error) error {
	var in, out []byte
	for {
		typ, p, err := s.ReadFrame(in)
		if err != nil {
			return fmt.Errorf("lazy page stream: %w", err)
		}
		in = p
		switch typ {
		case frameBye:
			return nil
		case frameReq:
			if len(p) != 16 {
				return fmt.Errorf("lazy page stream: bad request")
			}
			pid := int(binary.LittleEndian.Uint32(p))
			vaddr := binary.LittleEndian.Uint64(p[4:])
			n := int(binary.LittleEndian.Uint32(p[12:]))
			if n <= 0 || n > transport.MaxFrame-8 || n%pageSize != 0 {
				return fmt.Errorf("lazy page stream: bad request length %d", n)
			}
			if cap(out) < 8+n {
				out = make([]byte, 8+n)
			}
			out = out[:8+n]
			binary.LittleEndian.PutUint64(out, vaddr)
			if err := read(pid, vaddr, out[8:]); err != nil {
				err = s.WriteFrame(frameErr, []byte(err.Error()))
			} else {
				err = s.WriteFrame(framePages, out)
			}
			if err != nil {
				return err
			}
			if err := s.Flush(); err != nil {
				return err
			}
		default:
			return fmt.Errorf("lazy page stream: unknown frame %d", typ)
		}
	}
}

// ImageReader serves page data from an image directory (for ServePages).
func ImageReader(dir string) (read func(pid int, vaddr uint64, buf []byte) error, closer func()) {
	chains := map[int]localSource{}
	var all []*images.PageChain
	read = func(pid int, vaddr uint64, buf []byte) error {
		src, ok := chains[pid]
		if !ok {
			c := &images.PageChain{}
			runs, err := c.Resolve(dir, int32(pid))
			if err != nil {
				return err
			}
			all = append(all, c)
			src = localSource{runs}
			chains[pid] = src
		}
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
type mixedSource struct {
	local  localSource
	remote Source
	own    [][2]uint64 // ranges only the remote has, sorted
	stats  *Stats
}

func (m *mixedSource) isOwn(va uint64) bool {
	i := sort.Search(len(m.own), func(i int) bool { return m.own[i][1] > va })
	return i < len(m.own) && m.own[i][0] <= va
}

func (m *mixedSource) Read(pid int, vaddr uint64, buf []byte) error {
	// Split buf into runs of the same origin.
	for start := 0; start < len(buf); {
		own := m.isOwn(vaddr + uint64(start))
		end := start + pageSize
		for end < len(buf) && m.isOwn(vaddr+uint64(end)) == own {
			end += pageSize
		}
		var err error
		if own {
			err = m.remote.Read(pid, vaddr+uint64(start), buf[start:end])
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
