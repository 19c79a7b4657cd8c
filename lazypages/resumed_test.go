package lazypages

import (
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// TestResumedReleasesPrefetch: a handover holds prefetch back until the
// restore says the tree runs (Resumed), or until resumeWait has passed
// without a word.
func TestResumedReleasesPrefetch(t *testing.T) {
	s := &server{running: make(chan struct{})}
	if hold, _ := s.holding(); hold {
		t.Fatal("holding before any handover")
	}
	s.holdUntil = time.Now().Add(resumeWait)
	if hold, left := s.holding(); !hold || left <= 0 || left > resumeWait {
		t.Fatalf("after a handover: holding %v for %v", hold, left)
	}
	s.holdUntil = time.Now().Add(-time.Millisecond)
	if hold, _ := s.holding(); hold {
		t.Fatal("still holding past resumeWait")
	}
	s.holdUntil = time.Now().Add(resumeWait)

	sock := filepath.Join(t.TempDir(), SocketName)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	kinds := make(chan int, 1)
	go func() {
		c, err := l.AcceptUnix()
		if err != nil {
			kinds <- -1
			return
		}
		defer c.Close()
		_, _, _, kind, err := recvHandover(c, Options{}, slog.New(slog.DiscardHandler))
		if err != nil {
			kind = -1
		}
		c.Write([]byte{0})
		kinds <- kind
	}()
	if err := Resumed(sock); err != nil {
		t.Fatal(err)
	}
	if k := <-kinds; k != msgResumed {
		t.Fatalf("the daemon read message kind %d, want %d (resumed)", k, msgResumed)
	}
	s.resumed = true
	if hold, _ := s.holding(); hold {
		t.Fatal("holding after the restore said the tree runs")
	}
}
