package pageserver

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrycr/ferry/transport"
)

// serve runs one session into dir and returns a client of it and the
// session's outcome.
func serve(t *testing.T, dir string, zstd bool) (*Client, <-chan error) {
	t.Helper()
	l, err := transport.Listen("127.0.0.1:0", transport.TLS{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	done := make(chan error, 1)
	go func() {
		_, err := Serve(context.Background(), Options{Dir: dir, Listener: l})
		done <- err
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Connect(ctx, "tcp", l.Addr().String(), transport.TLS{}, zstd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Abort)
	return c, done
}

// Files arrive whole: runs of a few pages (gathered into larger writes),
// writes larger than the server's chunks, empty files, one after another.
func TestSessionStoresFiles(t *testing.T) {
	for _, zstd := range []bool{false, true} {
		dir := t.TempDir()
		c, done := serve(t, dir, zstd)
		want := map[string][]byte{}
		put := func(name string, parts ...[]byte) {
			w, err := c.Create(name)
			if err != nil {
				t.Fatal(err)
			}
			var all []byte
			for _, p := range parts {
				if _, err := w.Write(p); err != nil {
					t.Fatal(err)
				}
				all = append(all, p...)
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			want[name] = all
		}
		random := func(n int) []byte {
			b := make([]byte, n)
			rand.Read(b)
			return b
		}
		var runs [][]byte
		for i := range 700 {
			runs = append(runs, random(4096*(1+i%6)))
		}
		put("pages-1.img", runs...)
		put("empty.img")
		put("pages-2.img", random(3<<20), random(100), bytes.Repeat([]byte("x"), 5<<20))
		if err := c.Finish(); err != nil {
			t.Fatalf("zstd %v: %v", zstd, err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		for name, b := range want {
			got, err := os.ReadFile(filepath.Join(dir, name))
			if err != nil || !bytes.Equal(got, b) {
				t.Errorf("zstd %v: %s: %d bytes, want %d (%v)", zstd, name, len(got), len(b), err)
			}
		}
	}
}

// A file the server cannot write fails the session, and the client hears
// why.
func TestSessionWriteFailure(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "gone")
	c, done := serve(t, dir, false)
	w, err := c.Create("pages-1.img")
	if err == nil {
		w.Write(make([]byte, 8192))
		w.Close()
	}
	err = c.Finish()
	if err == nil || !strings.Contains(err.Error(), "pages-1.img") {
		t.Errorf("client: %v, want the file named", err)
	}
	if err := <-done; err == nil || !strings.Contains(err.Error(), "pages-1.img") {
		t.Errorf("server: %v, want the file named", err)
	}
}

// An empty data frame (nothing the client here sends, but the protocol
// allows it) before one larger than the server's chunks is stored as
// nothing, not a crash.
func TestSessionEmptyData(t *testing.T) {
	dir := t.TempDir()
	c, done := serve(t, dir, false)
	w, err := c.Create("pages-1.img")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.s.WriteFrame(frameData, nil); err != nil {
		t.Fatal(err)
	}
	big := bytes.Repeat([]byte("p"), 3<<20)
	if _, err := w.Write(big); err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(w.Close(), c.Finish(), <-done); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(dir, "pages-1.img")); err != nil || !bytes.Equal(got, big) {
		t.Fatalf("%d bytes stored, want %d (%v)", len(got), len(big), err)
	}
}
