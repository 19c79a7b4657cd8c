package dumpcore

import (
	"testing"

	"github.com/ferrycr/ferry/internal/ptrace"
)

func TestRestartFixup(t *testing.T) {
	neg := func(n int64) uint64 { return uint64(-n) }
	cases := []struct {
		name            string
		rax, orig, rip  uint64
		live            bool
		wantRax, wantIP uint64
		restarted       int64
	}{
		{"not in syscall", 5, ^uint64(0), 100, false, 5, 100, -1},
		{"completed syscall", 3, 0, 100, false, 3, 100, -1},
		{"ERESTARTSYS read", neg(512), 0, 100, false, 0, 98, 0},
		{"ERESTARTNOHAND pause", neg(514), 34, 100, false, 34, 98, 34},
		{"restart block restored", neg(516), 230, 100, false, 230, 98, 230},
		{"restart block live", neg(516), 230, 100, true, 219, 98, 230},
	}
	for _, c := range cases {
		r := ptrace.Regs{Rax: c.rax, Orig_rax: c.orig, Rip: c.rip}
		got := restartFixup(&r, c.live)
		if got != c.restarted || r.Rax != c.wantRax || r.Rip != c.wantIP {
			t.Errorf("%s: restarted %d rax %d rip %d; want %d %d %d", c.name, got, r.Rax, r.Rip, c.restarted, c.wantRax, c.wantIP)
		}
		if got >= 0 && r.Orig_rax != ^uint64(0) {
			t.Errorf("%s: orig_rax %d, want -1", c.name, int64(r.Orig_rax))
		}
	}
}
