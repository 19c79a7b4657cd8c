package images

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/ferrycr/ferry/images/pb"
)

// pagemapBatch is how many entries one PagemapBatch record holds at most.
const pagemapBatch = 1 << 16

// Pagemap entry flags (PagemapBatch.flags).
const (
	flagInParent = 1
	flagHoles    = 2 // with flagInParent: PageEntry.Holes
	knownFlags   = flagInParent | flagHoles
)

// PageEntry is one pagemap entry: NrPages pages from Vaddr, whose data is
// in this image set's pages file or, InParent, in a parent image set.
type PageEntry struct {
	Vaddr    uint64
	NrPages  uint32
	InParent bool
	// Holes (with InParent): the run stands for the parent's pages in
	// its range, which need not be all of them; pages the parent lacks
	// are not in the image. An incremental round records what it did not
	// copy so, one run per stretch between written pages, however
	// fragmented the parent's memory is there.
	Holes bool
}

// End is the address after the entry's last page.
func (e PageEntry) End() uint64 { return e.Vaddr + uint64(e.NrPages)*pageSize }

// WritePagemap writes a pagemap image to w: head, then entries (in address
// order) in batches, and closes w.
func WritePagemap(w *Writer, head *pb.PagemapHead, entries []PageEntry) error {
	err := w.Write(head)
	for len(entries) > 0 && err == nil {
		n := min(len(entries), pagemapBatch)
		b := &pb.PagemapBatch{Vaddr: make([]uint64, n), NrPages: make([]uint32, n), Flags: make([]uint32, n)}
		for i, e := range entries[:n] {
			b.Vaddr[i], b.NrPages[i], b.Flags[i] = e.Vaddr, e.NrPages, e.flags()
		}
		err = w.Write(b)
		entries = entries[n:]
	}
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	return err
}

func (e PageEntry) flags() uint32 {
	var f uint32
	if e.InParent {
		f |= flagInParent
		if e.Holes {
			f |= flagHoles
		}
	}
	return f
}

// ReadPagemap reads pagemap-PID.img in dir and checks its entries: page
// aligned, not empty, in address order without overlap. An error names
// the file and the offset of the bad record.
func ReadPagemap(dir string, pid int32) (*pb.PagemapHead, []PageEntry, error) {
	return readPagemapFile(dir, PagemapName(pid))
}

func readPagemapFile(dir, name string) (*pb.PagemapHead, []PageEntry, error) {
	r, err := Open(dir, name, KindPagemap)
	if err != nil {
		return nil, nil, err
	}
	defer r.Close()
	// An entry takes at least 8 bytes on disk (address, length, flags):
	// a process with 200,000 runs reads without regrowing.
	var hint int64
	if st, err := os.Stat(filepath.Join(dir, name)); err == nil {
		hint = min(st.Size()/8, 1<<24)
	}
	return readPagemap(r, int(hint))
}

func readPagemap(r *Reader, hint int) (*pb.PagemapHead, []PageEntry, error) {
	head := &pb.PagemapHead{}
	if err := r.Next(head); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil, formatErr(r.Path(), r.Offset(), ErrTruncated, "pagemap has no head record")
		}
		return nil, nil, err
	}
	entries := make([]PageEntry, 0, hint)
	var b batchBuf
	var prevEnd uint64
	for {
		at := r.Offset()
		if err := r.nextWith(b.decode, "PagemapBatch"); errors.Is(err, io.EOF) {
			return head, entries, nil
		} else if err != nil {
			return nil, nil, err
		}
		n := len(b.vaddr)
		if len(b.nrPages) != n || len(b.flags) != n || n > pagemapBatch {
			return nil, nil, formatErr(r.Path(), at, ErrCorrupt, "pagemap batch of %d/%d/%d entries", n, len(b.nrPages), len(b.flags))
		}
		for i := range n {
			f := b.flags[i]
			if f&^knownFlags != 0 || f == flagHoles {
				return nil, nil, formatErr(r.Path(), at, ErrCorrupt, "pagemap entry %#x+%d has flags %#x (entry %d of the batch)", b.vaddr[i], b.nrPages[i], f, i)
			}
			e := PageEntry{Vaddr: b.vaddr[i], NrPages: b.nrPages[i], InParent: f&flagInParent != 0, Holes: f&flagHoles != 0}
			if e.Vaddr%pageSize != 0 || e.NrPages == 0 || e.Vaddr < prevEnd || e.End() < e.Vaddr {
				return nil, nil, formatErr(r.Path(), at, ErrCorrupt, "bad pagemap entry %#x+%d (entry %d of the batch)", e.Vaddr, e.NrPages, i)
			}
			prevEnd = e.End()
			entries = append(entries, e)
		}
	}
}

// batchBuf decodes PagemapBatch records by hand, into slices reused from
// one batch to the next: the generic decoder allocates three slices per
// batch and costs several times more for the ~200,000 entries of a
// fragmented 4 GiB process.
type batchBuf struct {
	vaddr          []uint64
	nrPages, flags []uint32
}

func (b *batchBuf) decode(p []byte) error {
	if b.vaddr == nil {
		// Sized for the first batch (an entry takes at least 8 bytes),
		// reused for the next.
		n := len(p)/8 + 1
		b.vaddr, b.nrPages, b.flags = make([]uint64, 0, n), make([]uint32, 0, n), make([]uint32, 0, n)
	}
	b.vaddr, b.nrPages, b.flags = b.vaddr[:0], b.nrPages[:0], b.flags[:0]
	for len(p) > 0 {
		num, typ, n := protowire.ConsumeTag(p)
		if n < 0 {
			return protowire.ParseError(n)
		}
		p = p[n:]
		if num < 1 || num > 3 || (typ != protowire.BytesType && typ != protowire.VarintType) {
			if n = protowire.ConsumeFieldValue(num, typ, p); n < 0 {
				return protowire.ParseError(n)
			}
			p = p[n:]
			continue
		}
		var vals []byte
		if typ == protowire.BytesType { // packed, as proto3 writes them
			vals, n = protowire.ConsumeBytes(p)
		} else if _, n = protowire.ConsumeVarint(p); n > 0 {
			vals = p[:n]
		}
		if n < 0 {
			return protowire.ParseError(n)
		}
		p = p[n:]
		for len(vals) > 0 {
			v, m := binary.Uvarint(vals) // inlines, unlike protowire's
			if m <= 0 {
				return errors.New("bad varint")
			}
			vals = vals[m:]
			switch num {
			case 1:
				b.vaddr = append(b.vaddr, v)
			case 2:
				b.nrPages = append(b.nrPages, uint32(v))
			default:
				b.flags = append(b.flags, uint32(v))
			}
		}
	}
	return nil
}
