package lazypages

import (
	"slices"
	"testing"

	"github.com/ferrycr/ferry/images/pb"
)

func TestPendingOps(t *testing.T) {
	pp := newPending([]pendSpan{{0x1000, 0x5000, 0x1000}, {0x8000, 0x9000, 0x8000}})
	p := &pp
	p.remove(0x2000, 0x3000)
	if len(p.spans) != 3 || p.spans[1] != (pendSpan{0x3000, 0x5000, 0x3000}) || p.pages() != 4 {
		t.Fatalf("remove: %+v", p.spans)
	}
	p.remove(0x1000, 0x2000) // collapses the first span in place
	if f, ok := p.first(); !ok || f.start != 0x3000 || p.pages() != 3 {
		t.Fatalf("first after removing the head: %+v %v", f, ok)
	}
	p.move(0x3000, 0x20000, 0x2000)
	s, ok := p.find(0x21000)
	if !ok || s.src != 0x3000 || s.start != 0x20000 {
		t.Fatalf("move: %+v %v", s, ok)
	}
	if _, ok := p.find(0x3000); ok {
		t.Fatal("moved pages still at the old address")
	}
	if p.pages() != 1+2 {
		t.Fatalf("pages %d", p.pages())
	}
}

func TestLazySpans(t *testing.T) {
	const p = 4096
	vmas := []*pb.Vma{
		{Start: 20 * p, End: 30 * p, Kind: "anon"},
		{Start: 0, End: 10 * p, Kind: "heap"},
		{Start: 10 * p, End: 20 * p, Kind: "file"},           // not lazy
		{Start: 40 * p, End: 50 * p, Kind: "anon", Flags: 1}, // MAP_SHARED
	}
	ranges := [][2]uint64{{2 * p, 4 * p}, {8 * p, 25 * p}, {28 * p, 45 * p}}
	got := lazySpans(vmas, ranges, func(r [2]uint64) (uint64, uint64) { return r[0], r[1] })
	want := []pendSpan{{2 * p, 4 * p, 2 * p}, {8 * p, 10 * p, 8 * p}, {20 * p, 25 * p, 20 * p}, {28 * p, 30 * p, 28 * p}}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}

func TestPendingRestrict(t *testing.T) {
	const p = pageSize
	// A whole VMA pending, of which pages 2-3 were delivered and 10-19
	// moved to 100-109 (mremap) before the list arrived.
	pend := newPending([]pendSpan{{0, 20 * p, 0}})
	pend.remove(2*p, 4*p)
	pend.move(10*p, 100*p, 10*p)
	got := pend.restrict([][2]uint64{{1 * p, 3 * p}, {5 * p, 6 * p}, {12 * p, 14 * p}})
	want := []pendSpan{{1 * p, 2 * p, 1 * p}, {5 * p, 6 * p, 5 * p}, {102 * p, 104 * p, 12 * p}}
	if !slices.Equal(got.spans, want) || got.pages() != 4 {
		t.Fatalf("got %v (%d pages), want %v", got.spans, got.pages(), want)
	}
}
