package images

import (
	"errors"
	"slices"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/images/pb"
)

func TestPagemapRoundTrip(t *testing.T) {
	dir := t.TempDir()
	var entries []PageEntry
	for i := range uint64(pagemapBatch + 1000) { // more than one batch
		entries = append(entries, PageEntry{Vaddr: 0x10000 + i*3*pageSize, NrPages: 2, InParent: i%3 == 0})
	}
	w, err := Create(dir, PagemapName(7), KindPagemap)
	if err != nil {
		t.Fatal(err)
	}
	if err := WritePagemap(w, &pb.PagemapHead{PagesId: 7}, entries); err != nil {
		t.Fatal(err)
	}
	head, got, err := ReadPagemap(dir, 7)
	if err != nil {
		t.Fatal(err)
	}
	if head.PagesId != 7 || len(got) != len(entries) {
		t.Fatalf("head %v, %d entries, want %d", head, len(got), len(entries))
	}
	for i, e := range got {
		if e.Vaddr != entries[i].Vaddr || e.NrPages != 2 || e.InParent != entries[i].InParent {
			t.Fatalf("entry %d: %v, want %v", i, e, entries[i])
		}
	}
}

func TestPagemapRefusesBadEntries(t *testing.T) {
	for name, b := range map[string]*pb.PagemapBatch{
		"ragged":     {Vaddr: []uint64{0x1000, 0x3000}, NrPages: []uint32{1}, Flags: []uint32{0, 0}},
		"unaligned":  {Vaddr: []uint64{0x1001}, NrPages: []uint32{1}, Flags: []uint32{0}},
		"empty":      {Vaddr: []uint64{0x1000}, NrPages: []uint32{0}, Flags: []uint32{0}},
		"overlap":    {Vaddr: []uint64{0x1000, 0x2000}, NrPages: []uint32{2, 1}, Flags: []uint32{0, 0}},
		"wraps":      {Vaddr: []uint64{^uint64(0) &^ 0xfff}, NrPages: []uint32{2}, Flags: []uint32{0}},
		"descending": {Vaddr: []uint64{0x5000, 0x1000}, NrPages: []uint32{1, 1}, Flags: []uint32{0, 0}},
		"holes, own": {Vaddr: []uint64{0x1000}, NrPages: []uint32{1}, Flags: []uint32{flagHoles}},
		"new flag":   {Vaddr: []uint64{0x1000}, NrPages: []uint32{1}, Flags: []uint32{4 | flagInParent}},
	} {
		dir := t.TempDir()
		if err := WriteAll(dir, PagemapName(1), KindPagemap, &pb.PagemapHead{PagesId: 1}, b); err != nil {
			t.Fatal(err)
		}
		_, _, err := ReadPagemap(dir, 1)
		var fe *FormatError
		if !errors.As(err, &fe) || !errors.Is(err, ErrCorrupt) || fe.Offset == 0 {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestPagemapBatchDecode: the hand decoder reads what proto writes, packed
// or not, skips fields it does not know, and refuses a record cut inside
// a field.
func TestPagemapBatchDecode(t *testing.T) {
	want := &pb.PagemapBatch{Vaddr: []uint64{0x1000, 1 << 47}, NrPages: []uint32{1, 300}, Flags: []uint32{0, 1}}
	packed, err := proto.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	// The same entries unpacked, with an unknown field in between.
	var unpacked []byte
	for i := range want.Vaddr {
		unpacked = protowire.AppendTag(unpacked, 1, protowire.VarintType)
		unpacked = protowire.AppendVarint(unpacked, want.Vaddr[i])
		unpacked = protowire.AppendTag(unpacked, 9, protowire.BytesType)
		unpacked = protowire.AppendString(unpacked, "later")
		unpacked = protowire.AppendTag(unpacked, 2, protowire.VarintType)
		unpacked = protowire.AppendVarint(unpacked, uint64(want.NrPages[i]))
		unpacked = protowire.AppendTag(unpacked, 3, protowire.VarintType)
		unpacked = protowire.AppendVarint(unpacked, uint64(want.Flags[i]))
	}
	for name, rec := range map[string][]byte{"packed": packed, "unpacked": unpacked} {
		var b batchBuf
		if err := b.decode(rec); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !slices.Equal(b.vaddr, want.Vaddr) || !slices.Equal(b.nrPages, want.NrPages) || !slices.Equal(b.flags, want.Flags) {
			t.Fatalf("%s: got %v %v %v", name, b.vaddr, b.nrPages, b.flags)
		}
		if err := b.decode(rec[:len(rec)-1]); err == nil {
			t.Fatalf("%s: a record cut short decodes", name)
		}
	}
}
