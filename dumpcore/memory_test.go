package dumpcore

import (
	"fmt"
	"slices"
	"testing"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
)

func TestWithParentRuns(t *testing.T) {
	const p = pageSize
	parent := &regionSet{spans: []span{{0, 4 * p}, {6 * p, 10 * p}, {12 * p, 20 * p}}}
	// Dirty data at pages 2 and 15; gaps around them; page 21 from an
	// untracked VMA.
	entries := []images.PageEntry{{Vaddr: 2 * p, NrPages: 1}, {Vaddr: 15 * p, NrPages: 1}, {Vaddr: 21 * p, NrPages: 1}}
	gaps := []span{{0, 2 * p}, {3 * p, 15 * p}, {16 * p, 20 * p}}
	stats := &pb.DumpStats{}
	got := withParentRuns(entries, gaps, parent, stats)
	// One run per gap: 3-15 holds the parent's 3, 6-9 and 12-14.
	want := "0+2P 2+1 3+12PH 15+1 16+4P 21+1"
	s := ""
	for i, e := range got {
		if i > 0 {
			s += " "
		}
		s += fmt.Sprintf("%d+%d", e.Vaddr/p, e.NrPages)
		if e.InParent {
			s += "P"
		}
		if e.Holes {
			s += "H"
		}
	}
	if s != want {
		t.Fatalf("got  %s\nwant %s", s, want)
	}
	if stats.PagesSkippedParent != 2+1+4+3+4 {
		t.Fatalf("%d pages counted from the parent", stats.PagesSkippedParent)
	}
}

// TestHotPages: each thread's stack top (and the page below it), TLS,
// rseq area, robust list and clear_child_tid, as sorted merged ranges.
func TestHotPages(t *testing.T) {
	core := &pb.TaskCore{Threads: []*pb.ThreadCore{
		{Regs: &pb.GpRegs{Rsp: 0x7000_1010, FsBase: 0x5000_0100}, Rseq: &pb.Rseq{Ptr: 0x5000_0800}, RobustList: 0x5000_0900},
		{Regs: &pb.GpRegs{Rsp: 0x7000_3008}, ClearChildTid: 0x9000_0000},
	}}
	got := hotPages(core)
	// 0x7000_1010-512 is in page 0x7000_0000, 0x7000_3008-512 in
	// 0x7000_2000: the four stack pages merge into one range.
	want := [][2]uint64{{0x5000_0000, 0x5000_1000}, {0x7000_0000, 0x7000_4000}, {0x9000_0000, 0x9000_1000}}
	if !slices.Equal(got, want) {
		t.Fatalf("hot pages %x, want %x", got, want)
	}
}
