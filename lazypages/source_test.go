package lazypages

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/transport"
)

// streams returns the two ends of a page stream over a socket pair.
func streams(t *testing.T) (client, server *transport.Stream) {
	t.Helper()
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() {
		var err error
		server, err = transport.Server(b)
		done <- err
	}()
	client, err := transport.Client(a, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return client, server
}

// TestListBesidePages: a list, long to make and longer than one frame,
// is answered while page requests go on being served.
func TestListBesidePages(t *testing.T) {
	c, s := streams(t)
	read := func(pid int, va uint64, buf []byte) error {
		if pid != 7 {
			return errors.New("no such process")
		}
		for i := 0; i < len(buf); i += 8 {
			binary.LittleEndian.PutUint64(buf[i:], va+uint64(i))
		}
		return nil
	}
	served := make(chan struct{})
	const n = 1_500_000 // two frames
	list := func(pid int) ([][2]uint64, error) {
		<-served // a page request was answered while this one waits
		if pid != 7 {
			return nil, errors.New("no such process")
		}
		out := make([][2]uint64, n)
		for i := range out {
			out[i] = [2]uint64{uint64(i) * 2 * pageSize, uint64(i)*2*pageSize + pageSize}
		}
		return out, nil
	}
	done := make(chan error, 1)
	go func() { done <- ServePages(s, read, list) }()
	r := NewRemoteSource(c)
	type result struct {
		ranges [][2]uint64
		err    error
	}
	lists := make(chan result, 2)
	go func() { rs, err := r.List(7); lists <- result{rs, err} }()
	buf := make([]byte, 2*pageSize)
	if err := r.Read(7, 0x10000, buf); err != nil || binary.LittleEndian.Uint64(buf[pageSize:]) != 0x10000+pageSize {
		t.Fatalf("read beside a list: %v", err)
	}
	close(served)
	got := <-lists
	if got.err != nil || len(got.ranges) != n || got.ranges[n-1][0] != uint64(n-1)*2*pageSize {
		t.Fatalf("list: %d ranges, %v", len(got.ranges), got.err)
	}
	if _, err := r.List(8); err == nil {
		t.Fatal("a failed list reports no error")
	}
	if err := r.Read(8, 0, buf); err == nil {
		t.Fatal("a failed read reports no error")
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("serve: %v", err)
	}
}

// TestDialingRefused: a source whose dial fails answers every request
// with the dial's error, which names the address.
func TestDialingRefused(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nobody listens there now
	d := DialAsync(t.Context(), "tcp", addr, transport.TLS{}, false)
	if err := d.Read(1, 0, make([]byte, pageSize)); err == nil || !strings.Contains(err.Error(), addr) {
		t.Fatalf("read: %v", err)
	}
	if _, err := d.List(1); err == nil {
		t.Fatal("list: no error")
	}
	if err := d.Close(); err == nil {
		t.Fatal("close: no error")
	}
	d.Abort()
}

// fakeRemote answers reads with 0xEE bytes, counting them, and lists one
// range.
type fakeRemote struct{ reads int }

func (f *fakeRemote) Read(_ int, _ uint64, buf []byte) error {
	f.reads++
	for i := range buf {
		buf[i] = 0xEE
	}
	return nil
}

func (f *fakeRemote) List(int) ([][2]uint64, error) { return [][2]uint64{{0, pageSize}}, nil }

// TestMixedHotPages: with the lazy memory unlisted, the hot pages the
// images hold come from disk and every other page from the remote, which
// also lists.
func TestMixedHotPages(t *testing.T) {
	hot := localSource{[]images.PageRun{{Vaddr: 0x2000, Data: bytes.Repeat([]byte{0x11}, pageSize)}}}
	remote := &fakeRemote{}
	m := &mixedSource{local: hot, remote: remote, stats: &Stats{}, isOwn: func(va uint64) bool { return !hot.has(va) }}
	buf := make([]byte, 3*pageSize)
	if err := m.Read(1, 0x1000, buf); err != nil {
		t.Fatal(err)
	}
	if buf[0] != 0xEE || buf[pageSize] != 0x11 || buf[2*pageSize] != 0xEE || remote.reads != 2 {
		t.Fatalf("pages %x %x %x, %d remote reads", buf[0], buf[pageSize], buf[2*pageSize], remote.reads)
	}
	if m.stats.LocalPages != 1 || m.stats.RemotePages != 2 {
		t.Fatalf("stats %+v", m.stats)
	}
	if rs, err := m.List(1); err != nil || len(rs) != 1 {
		t.Fatalf("list: %v %v", rs, err)
	}
}

// TestRequestsInFlight: requests sent ahead are answered in order, each
// into its own buffer, each with its notification; when the stream
// breaks, those still in flight fail.
func TestRequestsInFlight(t *testing.T) {
	c, s := streams(t)
	read := func(pid int, va uint64, buf []byte) error {
		for i := 0; i < len(buf); i += 8 {
			binary.LittleEndian.PutUint64(buf[i:], va+uint64(i))
		}
		return nil
	}
	done := make(chan error, 1)
	go func() { done <- ServePages(s, read, nil) }()
	r := NewRemoteSource(c)
	notified := make(chan struct{}, 8)
	var fs []*Flight
	var bufs [][]byte
	for i := range 8 {
		buf := make([]byte, (i+1)*pageSize)
		bufs = append(bufs, buf)
		fs = append(fs, r.Request(7, uint64(i)<<20, buf, func() { notified <- struct{}{} }))
	}
	for i, f := range fs {
		<-f.Done()
		<-notified
		last := len(bufs[i]) - 8
		if f.Err() != nil || binary.LittleEndian.Uint64(bufs[i][last:]) != uint64(i)<<20+uint64(last) {
			t.Fatalf("request %d: %v", i, f.Err())
		}
	}
	r.Abort()
	if f := r.Request(7, 0, make([]byte, pageSize), nil); func() error { <-f.Done(); return f.Err() }() == nil {
		t.Fatal("a request on a closed stream did not fail")
	}
	<-done
}

// TestReplyForAnotherAddress: a page reply read straight into a request's
// buffer must be for the address it asked for; one that is not fails the
// request and the stream, naming both addresses.
func TestReplyForAnotherAddress(t *testing.T) {
	c, s := streams(t)
	r := NewRemoteSource(c)
	buf := make([]byte, pageSize)
	go func() {
		// net.Pipe is synchronous: the server side runs beside the
		// requests. The reader stops at the address, so the rest of the
		// reply stays unwritten until Abort.
		if typ, _, err := s.ReadFrame(nil); err != nil || typ != frameReq {
			return
		}
		reply := binary.LittleEndian.AppendUint64(nil, 0x20000)
		s.WriteFrame(framePages, append(reply, make([]byte, pageSize)...))
		s.Flush()
	}()
	f := r.Request(7, 0x10000, buf, nil)
	<-f.Done()
	if err := f.Err(); err == nil || !strings.Contains(err.Error(), "0x20000") || !strings.Contains(err.Error(), "0x10000") {
		t.Fatalf("got %v, want a reply for another address", err)
	}
	if g := r.Request(7, 0, buf, nil); func() error { <-g.Done(); return g.Err() }() == nil {
		t.Fatal("the stream went on after a wrong reply")
	}
	r.Abort()
}

// TestFaultsStream: a fault's pages (ReadUrgent) come on the daemon's
// second stream, answered while the first is held up serving prefetches.
func TestFaultsStream(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	gate := make(chan struct{})
	read := func(pid int, va uint64, buf []byte) error {
		if va != 99<<20 {
			<-gate // prefetches wait
		}
		binary.LittleEndian.PutUint64(buf, va)
		return nil
	}
	served := make(chan error, 1)
	go func() { served <- ServeSession(context.Background(), l, nil, read, nil) }()
	r, err := DialRemote(context.Background(), "tcp", l.Addr().String(), transport.TLS{}, false)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); r.faults.Load() == nil; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no stream for faults")
		}
	}
	var fs []*Flight
	for i := range 8 {
		fs = append(fs, r.Request(7, uint64(i)<<20, make([]byte, pageSize), nil))
	}
	buf := make([]byte, pageSize)
	urgent := make(chan error, 1)
	go func() { urgent <- r.ReadUrgent(7, 99<<20, buf) }()
	select {
	case err := <-urgent:
		if err != nil || binary.LittleEndian.Uint64(buf) != 99<<20 {
			t.Fatalf("fault's pages: %v, %#x", err, binary.LittleEndian.Uint64(buf))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the fault's pages wait behind the prefetches")
	}
	close(gate)
	for _, f := range fs {
		if <-f.Done(); f.Err() != nil {
			t.Fatal(f.Err())
		}
	}
	r.Close()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
}

// slowLink forwards TCP connections to target through a link of rate
// bytes per second that they share (16 KiB at a time, in turn), as
// between two hosts: what a stream sends waits in buffers on the way.
func slowLink(t *testing.T, target string, rate int) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	var mu sync.Mutex
	next := time.Now()
	wire := func(n int) { // waits for the link to carry n bytes
		mu.Lock()
		if now := time.Now(); next.Before(now) {
			next = now
		}
		next = next.Add(time.Duration(n) * time.Second / time.Duration(rate))
		mu.Unlock()
		time.Sleep(time.Until(next))
	}
	pipe := func(dst, src net.Conn) {
		defer dst.Close()
		buf := make([]byte, 16<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				wire(n)
				if _, err := dst.Write(buf[:n]); err != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			go pipe(u, c)
			go pipe(c, u)
		}
	}()
	return l.Addr().String()
}

// TestFaultsPassPrefetches: over a link slower than the hosts (50 MB/s),
// with 4 MiB of prefetches in flight, a fault's 64 KiB arrive while those
// are still on their way (on the stream for faults); on the first stream
// they would come after them all.
func TestFaultsPassPrefetches(t *testing.T) {
	for _, separate := range []bool{true, false} {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		read := func(pid int, va uint64, buf []byte) error { return nil }
		served := make(chan error, 1)
		go func() { served <- ServeSession(context.Background(), l, nil, read, nil) }()
		r, err := DialRemote(context.Background(), "tcp", slowLink(t, l.Addr().String(), 50<<20), transport.TLS{}, false)
		if err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(10 * time.Second); r.faults.Load() == nil; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("no stream for faults")
			}
		}
		if !separate {
			// As before the stream for faults: the fault's request
			// queues behind the prefetches.
			f := r.faults.Swap(nil)
			defer f.Close()
		}
		var fs []*Flight
		for range aheadDepth {
			fs = append(fs, r.Request(1, 0, make([]byte, aheadChunk), nil))
		}
		t0 := time.Now()
		if err := r.ReadUrgent(1, 0, make([]byte, faultChunk)); err != nil {
			t.Fatal(err)
		}
		fault := time.Since(t0)
		pending := 0
		for _, f := range fs {
			select {
			case <-f.Done():
			default:
				pending++
			}
			<-f.Done()
		}
		t.Logf("separate stream %v: the fault's pages in %v, %d of %d prefetches still on their way", separate, fault.Round(time.Millisecond), pending, len(fs))
		if separate && pending == 0 {
			t.Error("the fault's pages waited for every prefetch")
		}
		if !separate && pending != 0 {
			t.Error("on one stream, the fault's pages came before prefetches sent ahead of them")
		}
		r.Close()
		if err := <-served; err != nil {
			t.Fatal(err)
		}
		l.Close()
	}
}
