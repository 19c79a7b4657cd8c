package restorecore

import (
	"fmt"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/internal/compel"
)

// atFdcwd is AT_FDCWD (-100) as a syscall argument register.
const atFdcwd = ^uint64(99)

// fillBatch bounds one process_vm_writev call.
const fillBatch = 64 << 20

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
	var batch uint64
	for _, e := range b.p.pagemap {
		n := uint64(e.NrPages) * pageSize
		if off+n > uint64(len(data)) {
			return fmt.Errorf("%s/%s: pagemap wants %d bytes at offset %d, file has %d: %w",
				b.r.is.dir, name, n, off, len(data), images.ErrTruncated)
		}
		segs = append(segs, compel.Segment{Addr: e.Vaddr, Local: data[off : off+n]})
		off += n
		batch += n
		b.r.stats.PagesRestored += uint64(e.NrPages)
		if batch >= fillBatch {
			if err := compel.WriteMem(b.pid, segs); err != nil {
				return err
			}
			segs, batch = segs[:0], 0
		}
	}
	if uint64(len(data)) != off {
		return fmt.Errorf("%s/%s: %d bytes of page data, pagemap accounts for %d: %w",
			b.r.is.dir, name, len(data), off, images.ErrCorrupt)
	}
	return compel.WriteMem(b.pid, segs)
}
