package images

import (
	"errors"
	"io"

	"github.com/ferrycr/ferry/images/pb"
)

// pagemapBatch is how many entries one PagemapBatch record holds at most.
const pagemapBatch = 1 << 16

const flagInParent = 1

// WritePagemap writes a pagemap image to w: head, then entries (in address
// order) in batches, and closes w.
func WritePagemap(w *Writer, head *pb.PagemapHead, entries []*pb.PagemapEntry) error {
	err := w.Write(head)
	for len(entries) > 0 && err == nil {
		n := min(len(entries), pagemapBatch)
		b := &pb.PagemapBatch{Vaddr: make([]uint64, n), NrPages: make([]uint32, n), Flags: make([]uint32, n)}
		for i, e := range entries[:n] {
			b.Vaddr[i], b.NrPages[i] = e.Vaddr, e.NrPages
			if e.InParent {
				b.Flags[i] = flagInParent
			}
		}
		err = w.Write(b)
		entries = entries[n:]
	}
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	return err
}

// ReadPagemap reads pagemap-PID.img in dir and checks its entries: page
// aligned, not empty, in address order without overlap. An error names
// the file and the offset of the bad record.
func ReadPagemap(dir string, pid int32) (*pb.PagemapHead, []*pb.PagemapEntry, error) {
	return readPagemapFile(dir, PagemapName(pid))
}

func readPagemapFile(dir, name string) (*pb.PagemapHead, []*pb.PagemapEntry, error) {
	r, err := Open(dir, name, KindPagemap)
	if err != nil {
		return nil, nil, err
	}
	defer r.Close()
	return readPagemap(r)
}

func readPagemap(r *Reader) (*pb.PagemapHead, []*pb.PagemapEntry, error) {
	head := &pb.PagemapHead{}
	if err := r.Next(head); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil, formatErr(r.Path(), r.Offset(), ErrTruncated, "pagemap has no head record")
		}
		return nil, nil, err
	}
	var entries []*pb.PagemapEntry
	var prevEnd uint64
	for {
		at := r.Offset()
		b := &pb.PagemapBatch{}
		if err := r.Next(b); errors.Is(err, io.EOF) {
			return head, entries, nil
		} else if err != nil {
			return nil, nil, err
		}
		n := len(b.Vaddr)
		if len(b.NrPages) != n || len(b.Flags) != n || n > pagemapBatch {
			return nil, nil, formatErr(r.Path(), at, ErrCorrupt, "pagemap batch of %d/%d/%d entries", n, len(b.NrPages), len(b.Flags))
		}
		slab := make([]pb.PagemapEntry, n)
		for i := range n {
			e := &slab[i]
			e.Vaddr, e.NrPages, e.InParent = b.Vaddr[i], b.NrPages[i], b.Flags[i]&flagInParent != 0
			if e.Vaddr%pageSize != 0 || e.NrPages == 0 || e.Vaddr < prevEnd || e.Vaddr+uint64(e.NrPages)*pageSize < e.Vaddr {
				return nil, nil, formatErr(r.Path(), at, ErrCorrupt, "bad pagemap entry %#x+%d (entry %d of the batch)", e.Vaddr, e.NrPages, i)
			}
			prevEnd = e.Vaddr + uint64(e.NrPages)*pageSize
			entries = append(entries, e)
		}
	}
}
