package restorecore

import (
	"runtime"

	"golang.org/x/sync/errgroup"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/lazypages"
)

// atFdcwd is AT_FDCWD (-100) as a syscall argument register.
const atFdcwd = ^uint64(99)

// fillPages copies the process's pages (resolved through the image chain
// at load time, mmapped) into its memory with process_vm_writev.
func (b *builder) fillPages() error {
	if b.p.remotePages {
		// The daemon fetches them from its page server and writes them.
		var eager [][2]uint64
		for _, r := range b.p.ranges {
			eachOverlap(b.p.mm.Vmas, r[0], r[1], func(v *pb.Vma, a, e uint64) {
				if !b.lazy(v) {
					eager = append(eager, [2]uint64{a, e})
				}
			})
		}
		return lazypages.Fill(b.r.opts.LazySocket, int(b.p.pstree.Pid), b.pid, eager)
	}
	var segs []compel.Segment
	var total uint64
	for _, r := range b.p.runs {
		b.eachEager(r, func(part images.PageRun) {
			segs = append(segs, compel.Segment{Addr: part.Vaddr, Local: part.Data})
			total += uint64(len(part.Data))
		})
	}
	b.r.stats.PagesRestored += total / pageSize
	return fillParallel(b.pid, segs, total)
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
