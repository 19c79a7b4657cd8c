package restorecore

import (
	"fmt"
	"runtime"

	"golang.org/x/sync/errgroup"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/internal/compel"
)

// atFdcwd is AT_FDCWD (-100) as a syscall argument register.
const atFdcwd = ^uint64(99)

// fillPages copies the process's pages from the mmapped page file into its
// memory with process_vm_writev, in large batches.
func (b *builder) fillPages() error {
	if len(b.p.pagemap) == 0 {
		return nil
	}
	name := fmt.Sprintf("pages-%d.img", b.p.pagesID)
	pr, err := images.OpenPages(b.r.is.dir, name)
	if err != nil {
		return err
	}
	defer pr.Close()
	data, err := pr.Bytes()
	if err != nil {
		return err
	}
	var off uint64
	var segs []compel.Segment
	for _, e := range b.p.pagemap {
		n := uint64(e.NrPages) * pageSize
		if off+n > uint64(len(data)) {
			return fmt.Errorf("%s/%s: pagemap wants %d bytes at offset %d, file has %d: %w",
				b.r.is.dir, name, n, off, len(data), images.ErrTruncated)
		}
		segs = append(segs, compel.Segment{Addr: e.Vaddr, Local: data[off : off+n]})
		off += n
		b.r.stats.PagesRestored += uint64(e.NrPages)
	}
	if uint64(len(data)) != off {
		return fmt.Errorf("%s/%s: %d bytes of page data, pagemap accounts for %d: %w",
			b.r.is.dir, name, len(data), off, images.ErrCorrupt)
	}
	return fillParallel(b.pid, segs, off)
}

// fillParallel writes segs with one writer per CPU: the cost of filling
// fresh memory is page allocation and first touch, which CPUs do in
// parallel.
func fillParallel(pid int, segs []compel.Segment, total uint64) error {
	workers := min(runtime.NumCPU(), 4)
	if total < 8<<20 || workers < 2 {
		return compel.WriteMem(pid, segs)
	}
	share := total / uint64(workers)
	var g errgroup.Group
	var part []compel.Segment
	var acc uint64
	for _, s := range segs {
		for len(s.Local) > 0 {
			take := min(uint64(len(s.Local)), share-acc)
			part = append(part, compel.Segment{Addr: s.Addr, Local: s.Local[:take]})
			s = compel.Segment{Addr: s.Addr + take, Local: s.Local[take:]}
			acc += take
			if acc == share {
				p := part
				g.Go(func() error { return compel.WriteMem(pid, p) })
				part, acc = nil, 0
			}
		}
	}
	if len(part) > 0 {
		p := part
		g.Go(func() error { return compel.WriteMem(pid, p) })
	}
	return g.Wait()
}
