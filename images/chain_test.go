package images

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/ferrycr/ferry/images/pb"
)

// writeRound writes an image set of process 1 in dir: entries, with data
// (one byte value per page) for those not in the parent.
func writeRound(t *testing.T, dir, parent string, entries []PageEntry, fill byte) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := WriteAll(dir, InventoryName, KindInventory, &pb.Inventory{ParentDir: parent, PreDump: true}); err != nil {
		t.Fatal(err)
	}
	w, err := Create(dir, PagemapName(1), KindPagemap)
	if err != nil {
		t.Fatal(err)
	}
	if err := WritePagemap(w, &pb.PagemapHead{PagesId: 1}, entries); err != nil {
		t.Fatal(err)
	}
	pw, err := CreatePages(dir, PagesName(1))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !e.InParent {
			pw.Write(bytes.Repeat([]byte{fill}, int(e.NrPages)*pageSize))
		}
	}
	if err := pw.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestChainCache: a chain resolved with a cache takes the parent's runs
// from it (the same data), and a set resolved whole comes from it too.
func TestChainCache(t *testing.T) {
	dir := t.TempDir()
	r1, r2 := filepath.Join(dir, "1"), filepath.Join(dir, "2")
	writeRound(t, r1, "", []PageEntry{{Vaddr: 0x10000, NrPages: 4}}, 0xaa)
	writeRound(t, r2, "../1", []PageEntry{{Vaddr: 0x10000, NrPages: 1}, {Vaddr: 0x11000, NrPages: 3, InParent: true}}, 0xbb)
	cc := &ChainCache{}
	defer cc.Close()
	if err := cc.Resolve(r1, 1); err != nil {
		t.Fatal(err)
	}
	if err := cc.Resolve(r2, 1); err != nil {
		t.Fatal(err)
	}
	cached, _ := cc.lookup(r1, 1, false)
	c := &PageChain{Cache: cc}
	defer c.Close()
	runs, err := c.Resolve(r2, 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != 2 || runs[0].Data[0] != 0xbb || runs[1].Vaddr != 0x11000 || len(runs[1].Data) != 3*pageSize || runs[1].Data[0] != 0xaa {
		t.Fatalf("runs %v", runs)
	}
	if &runs[1].Data[0] != &cached[0].Data[pageSize] {
		t.Fatal("the parent's data was not taken from the cache")
	}
	if len(c.closers) != 0 {
		t.Fatalf("a set the cache holds was opened again (%d files)", len(c.closers))
	}
	// A cache holding only the parent: the set itself is read, its
	// parent is not.
	only := &ChainCache{}
	defer only.Close()
	if err := only.Resolve(r1, 1); err != nil {
		t.Fatal(err)
	}
	parent, _ := only.lookup(r1, 1, false)
	c2 := &PageChain{Cache: only}
	defer c2.Close()
	runs, err = c2.Resolve(r2, 1)
	if err != nil || len(runs) != 2 || &runs[1].Data[0] != &parent[0].Data[pageSize] || len(c2.closers) != 1 {
		t.Fatalf("with the parent cached: %v, %d runs, %d files opened", err, len(runs), len(c2.closers))
	}
	cc.Close()
	if err := cc.Resolve(r1, 1); err == nil {
		t.Fatal("a closed cache resolved")
	}
}

// TestChainHoles: a parent run with holes stands for the pages the parent
// chain has in its range, through two levels, and no others.
func TestChainHoles(t *testing.T) {
	dir := t.TempDir()
	r1, r2, r3 := filepath.Join(dir, "1"), filepath.Join(dir, "2"), filepath.Join(dir, "3")
	// Round 1: pages 0x10-0x13 and 0x16. Round 2: page 0x12 again, the
	// rest from round 1 as two runs, one with a hole (0x14-0x15).
	writeRound(t, r1, "", []PageEntry{{Vaddr: 0x10000, NrPages: 4}, {Vaddr: 0x16000, NrPages: 1}}, 0xaa)
	writeRound(t, r2, "../1", []PageEntry{
		{Vaddr: 0x10000, NrPages: 2, InParent: true},
		{Vaddr: 0x12000, NrPages: 1},
		{Vaddr: 0x13000, NrPages: 4, InParent: true, Holes: true},
	}, 0xbb)
	// Round 3: page 0x20 new, everything else from round 2 in one run.
	writeRound(t, r3, "../2", []PageEntry{
		{Vaddr: 0x10000, NrPages: 7, InParent: true, Holes: true},
		{Vaddr: 0x20000, NrPages: 1},
	}, 0xcc)
	var c PageChain
	defer c.Close()
	runs, err := c.Resolve(r3, 1)
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		va    uint64
		pages int
		fill  byte
	}{{0x10000, 2, 0xaa}, {0x12000, 1, 0xbb}, {0x13000, 1, 0xaa}, {0x16000, 1, 0xaa}, {0x20000, 1, 0xcc}}
	if len(runs) != len(want) {
		t.Fatalf("%d runs, want %d: %x", len(runs), len(want), Narrow([]PageEntry{{Vaddr: 0, NrPages: 1 << 30, InParent: true, Holes: true}}, runs, RunBounds))
	}
	for i, w := range want {
		r := runs[i]
		if r.Vaddr != w.va || len(r.Data) != w.pages*pageSize || r.Data[0] != w.fill {
			t.Errorf("run %d: %#x+%d (%#x), want %#x+%d (%#x)", i, r.Vaddr, len(r.Data)/pageSize, r.Data[0], w.va, w.pages, w.fill)
		}
	}
	pages, err := PagemapPages(r3, 1)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(pages, [][2]uint64{{0x10000, 0x14000}, {0x16000, 0x17000}, {0x20000, 0x21000}}) {
		t.Fatalf("pages %x", pages)
	}
	_, entries, err := ReadPagemap(r3, 1)
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Pages(r3, 1, entries)
	if err != nil || !slices.Equal(got, pages) {
		t.Fatalf("Pages: %x, %v", got, err)
	}
	// Without its parent, a run with holes cannot be told.
	os.RemoveAll(r2)
	if _, err := PagemapPages(r3, 1); err == nil {
		t.Fatal("resolved without the parent")
	}
}
