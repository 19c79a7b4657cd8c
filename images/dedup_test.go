package images

import "testing"

func TestOverlaps(t *testing.T) {
	stored := []dataRun{{vaddr: 0x3000, n: 2}, {vaddr: 0x10000, n: 1}}
	runs := []dataRun{{vaddr: 0x1000, n: 4, off: 0}, {vaddr: 0xf000, n: 3, off: 4 * 4096}}
	got := overlaps(stored, runs)
	want := []dataRun{{vaddr: 0x3000, n: 2, off: 2 * 4096}, {vaddr: 0x10000, n: 1, off: 5 * 4096}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("got %+v, want %+v", got, want)
	}
}
