package lazypages

import (
	"encoding/binary"
	"errors"
	"net"
	"testing"

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
