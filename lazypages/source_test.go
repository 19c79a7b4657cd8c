package lazypages

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"strings"
	"testing"

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
