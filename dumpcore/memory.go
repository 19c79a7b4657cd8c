package dumpcore

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/vmflags"
	"github.com/ferrycr/ferry/lazypages"
	"github.com/ferrycr/ferry/uffd"
)

const pageSize = 4096

// VMA kinds as stored in images (pb.Vma.Kind).
const (
	KindAnon        = "anon"
	KindHeap        = "heap"
	KindStack       = "stack"
	KindSharedAnon  = "shared-anon"
	KindAio         = "aio" // an AIO ring: made by io_setup, brought to its head and tail
	KindFilePrivate = "file-private"
	KindFileShared  = "file-shared"
	KindVdso        = "vdso"
	KindVvar        = "vvar"
	KindVvarVclock  = "vvar_vclock"
	KindVsyscall    = "vsyscall"
)

// pagemap bits (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmPresent    = 1 << 63
	pmSwapped    = 1 << 62
	pmFileShared = 1 << 61
	pmGuard      = 1 << 58 // a guard region page (MADV_GUARD_INSTALL, 6.14)
	pmUffdWP     = 1 << 57 // write-protected by a userfaultfd

	// UFFDIO_REGISTER_MODE_* (include/uapi/linux/userfaultfd.h).
	uffdMissing, uffdWP, uffdMinor = 1, 2, 4
)

func classify(v *proc.Vma) (string, error) {
	switch v.Name {
	case "[vdso]":
		return KindVdso, nil
	case "[vvar]":
		return KindVvar, nil
	case "[vvar_vclock]":
		return KindVvarVclock, nil
	case "[vsyscall]":
		return KindVsyscall, nil
	case "[heap]":
		return KindHeap, nil
	case "[stack]":
		return KindStack, nil
	}
	shared := v.Perms[3] == 's'
	if shared && strings.HasPrefix(v.Name, "/[aio]") {
		return KindAio, nil
	}
	if shared {
		if v.Inode == 0 || strings.HasPrefix(v.Name, "/dev/zero") || strings.HasPrefix(v.Name, "/SYSV") {
			return KindSharedAnon, nil
		}
		return KindFileShared, nil // a deleted file is carried as a ghost
	}
	if v.Inode != 0 && strings.HasPrefix(v.Name, "/") {
		return KindFilePrivate, nil
	}
	if strings.HasPrefix(v.Name, "[") && !strings.HasPrefix(v.Name, "[anon:") && !strings.HasPrefix(v.Name, "[stack:") {
		return "", fmt.Errorf("special mapping %s at %#x: %w", v.Name, v.Start, ErrUnsupported)
	}
	return KindAnon, nil
}

func protOf(perms string) uint32 {
	var p uint32
	if perms[0] == 'r' {
		p |= unix.PROT_READ
	}
	if perms[1] == 'w' {
		p |= unix.PROT_WRITE
	}
	if perms[2] == 'x' {
		p |= unix.PROT_EXEC
	}
	return p
}

func (d *dumper) collectVmas(img *imageSet) error {
	vmas, err := d.readVmas()
	if err != nil {
		return err
	}
	d.vmas = vmas
	for i := range vmas {
		v := &vmas[i]
		kind, err := classify(v)
		if err != nil {
			return err
		}
		pv := &pb.Vma{Start: v.Start, End: v.End, Pgoff: v.Pgoff, Prot: protOf(v.Perms),
			VmFlags: v.VmFlags, Kind: kind, Name: v.Name}
		switch kind {
		case KindAio:
			// struct aio_ring: id, nr, head, tail, ...
			hdr := make([]byte, 16)
			if err := compel.ReadMem(d.opts.Pid, []compel.Segment{{Addr: v.Start, Local: hdr}}); err != nil {
				return fmt.Errorf("AIO ring at %#x: %w", v.Start, err)
			}
			pv.Flags = unix.MAP_SHARED
			pv.AioNr, pv.AioHead, pv.AioTail = binary.LittleEndian.Uint32(hdr[4:]), binary.LittleEndian.Uint32(hdr[8:]), binary.LittleEndian.Uint32(hdr[12:])
		case KindSharedAnon:
			pv.Flags = unix.MAP_SHARED | unix.MAP_ANONYMOUS
			pv.ShmemIno = v.Inode
			pv.Sysv = strings.HasPrefix(v.Name, "/SYSV")           // its inode is the segment's id
			if pv.Sysv && (d.t == nil || d.t.ownNs["ipc"] == "") { // else in ipc.img
				var ds unix.SysvShmDesc
				if _, err := unix.SysvShmCtl(int(v.Inode), unix.IPC_STAT, &ds); err != nil {
					return fmt.Errorf("SysV shared memory %d at %#x: %w", v.Inode, v.Start, err)
				}
				const shmDest = 0o1000 // SHM_DEST
				pv.SysvSeg = &pb.SysvShm{Key: ds.Perm.Key, Mode: ds.Perm.Mode & 0o777, Uid: ds.Perm.Uid, Gid: ds.Perm.Gid,
					Size: ds.Segsz, Removed: ds.Perm.Mode&shmDest != 0}
			}
		case KindFileShared:
			pv.Flags = unix.MAP_SHARED
		case KindFilePrivate:
			pv.Flags = unix.MAP_PRIVATE
		default:
			pv.Flags = unix.MAP_PRIVATE | unix.MAP_ANONYMOUS
		}
		for mode, flag := range map[uint32]string{uffdMissing: "um", uffdWP: "uw", uffdMinor: "ui"} {
			if v.Has(flag) {
				pv.UffdModes |= mode
			}
		}
		if v.Has("gd") {
			pv.Flags |= unix.MAP_GROWSDOWN
		}
		if v.Has("nr") {
			pv.Flags |= unix.MAP_NORESERVE
		}
		if v.Has("dp") && pv.Flags&unix.MAP_TYPE == unix.MAP_PRIVATE {
			// MAP_DROPPABLE (6.11): a mapping type of its own, for
			// memory the kernel may drop under pressure.
			const mapDroppable = 0x08
			pv.Flags = pv.Flags&^unix.MAP_TYPE | mapDroppable
		}
		if kind == KindFilePrivate || kind == KindFileShared {
			id, err := img.files.addMapped(d.opts.Pid, v)
			if err != nil {
				return err
			}
			pv.FileId = id
		}
		img.mm.Vmas = append(img.mm.Vmas, pv)
	}
	return nil
}

// vmaKey identifies a VMA's layout: what maps shows of it.
type vmaKey struct {
	start, end, pgoff, inode uint64
	perms, dev, name         string
}

func keyOf(v *proc.Vma) vmaKey {
	return vmaKey{v.Start, v.End, v.Pgoff, v.Inode, v.Perms, v.Dev, v.Name}
}

// readVmas reads the VMAs with their flags: from smaps, or, with flags
// read before the freeze, from maps when every VMA still has the layout
// it had then.
func (d *dumper) readVmas() ([]proc.Vma, error) {
	pid := d.opts.Pid
	if d.early == nil {
		return vmflags.Read(pid)
	}
	vmas, err := proc.ReadMaps(pid)
	if err != nil {
		return nil, err
	}
	used := make([]vmaKey, 0, len(vmas))
	for i := range vmas {
		k := keyOf(&vmas[i])
		flags, ok := d.early[k]
		if !ok {
			d.log.Debug("a VMA changed before the freeze: reading the flags again", "vma", fmt.Sprintf("%#x-%#x", k.start, k.end))
			return vmflags.Read(pid)
		}
		vmas[i].VmFlags = flags
		used = append(used, k)
	}
	d.usedEarly = used
	return vmas, nil
}

// flagsMoved reads smaps after the resume and reports whether a VMA whose
// flags were read before the freeze now shows another layout or flags.
//
// A VMA may have merged with its neighbours meanwhile: closing ferry's
// dirty tracker takes its write protection ("uw") off, and VMAs that
// differed only in that merge. That is no change: a VMA inside one of the
// same kind (file, offset, permissions) and flags is the same.
func (d *dumper) flagsMoved() (bool, error) {
	if len(d.usedEarly) == 0 {
		return false, nil
	}
	after, err := vmflags.Read(d.opts.Pid)
	if err != nil {
		return false, err
	}
	flags := func(f []string) []string { return f }
	if d.tracker != nil || len(d.files.staleTrackers[d.opts.Pid]) > 0 {
		// The write protection is ferry's own (a tracked process may have
		// no other: checkUffd), and goes when its tracker is closed.
		flags = func(f []string) []string {
			return slices.DeleteFunc(slices.Clone(f), func(s string) bool { return s == "uw" })
		}
	}
	for _, k := range d.usedEarly {
		i := sort.Search(len(after), func(i int) bool { return after[i].End > k.start })
		if i == len(after) || !sameVma(k, &after[i]) || !slices.Equal(flags(after[i].VmFlags), flags(d.early[k])) {
			d.log.Info("a VMA changed around the freeze: its flags at the freeze are not certain",
				"vma", fmt.Sprintf("%#x-%#x", k.start, k.end))
			return true, nil
		}
	}
	return false, nil
}

// sameVma reports whether v is the VMA k or one it merged into.
func sameVma(k vmaKey, v *proc.Vma) bool {
	if v.Start > k.start || v.End < k.end || v.Perms != k.perms || v.Dev != k.dev || v.Inode != k.inode || v.Name != k.name {
		return false
	}
	return k.inode == 0 || v.Pgoff+(k.start-v.Start) == k.pgoff // file offsets go on
}

// dumpable reports whether a VMA kind has pages in the image, and whether
// all-zero pages of it may be left out.
func dumpable(kind string) (pages, skipZero bool) {
	switch kind {
	case KindAnon, KindHeap, KindStack, KindSharedAnon, KindAio:
		return true, true
	case KindFilePrivate:
		return true, false
	}
	return false, false
}

var zeroPage = make([]byte, pageSize)

// pageDumper streams a process's pages to pages-<pid>.img. Reading the
// target and writing the image overlap: the reader fills one buffer while
// the writer writes the previous one.
type pageDumper struct {
	pid     int
	pm      *os.File // /proc/PID/pagemap
	mem     *os.File // /proc/PID/mem, for pages process_vm_readv cannot read
	out     *images.PageWriter
	entries []images.PageEntry
	// gaps are the stretches of tracked VMAs outside the dirty set: what
	// the parent holds there goes into the pagemap as parent runs.
	gaps  []span
	stats *pb.DumpStats

	free    chan []byte
	batches chan batch
	// Incremental rounds: a page not in dirty but in parent is recorded
	// as in_parent instead of copied; nil parent copies everything.
	dirty, parent *regionSet
	// tolerant: the process runs (pre-dump), so pages may vanish under
	// the copy; such pages are left out rather than failing the round.
	tolerant bool
	// noData (dump --lazy-pages): list the pages in the pagemap without
	// copying them; a lazy-pages daemon fetches them from the process.
	noData bool
	// sc lists them when the kernel has PAGEMAP_SCAN (nil: read pagemap).
	sc *uffd.Scanner
	// unlisted: the memory a lazy-pages daemon serves is left out
	// (Options.NoPageData).
	unlisted bool
	// readTime and writeTime split the memory dump between reading the
	// target and writing the image.
	readTime, writeTime time.Duration
}

// batch is a buffer of selected pages, back to back, with what to do for
// each page in address order.
type batch struct {
	buf      []byte
	items    []item
	skipZero bool
	// listOnly: record the pages in the pagemap, no data (--lazy-pages).
	listOnly bool
}

// item is one page of a batch: its data is the next page of buf, or it is
// unchanged since the parent image, or it could not be read (skipped).
type item struct {
	va   uint64
	kind uint8
	n    uint64 // pages, for itemParent runs (data and skip items are 1)
}

const (
	itemData uint8 = iota
	itemParent
	itemSkip // data page whose read failed while the process ran
)

const (
	readChunk = 2 << 20 // bytes per batch: small enough to stay in cache
	nBuffers  = 3
)

// chunks holds read buffers of readChunk bytes, shared by the processes
// of a tree (allocating them per process costs more than dumping a small
// process's pages).
var chunks = sync.Pool{New: func() any { return make([]byte, readChunk) }}

func (d *dumper) dumpPages(ctx context.Context, img *imageSet) error {
	pid := d.opts.Pid
	start := time.Now()
	pm, err := os.Open(proc.Path(pid, "pagemap"))
	if err != nil {
		return err
	}
	defer pm.Close()
	mem, err := os.Open(proc.Path(pid, "mem"))
	if err != nil {
		return err
	}
	defer mem.Close()
	pd := &pageDumper{pid: pid, pm: pm, mem: mem, stats: d.stats,
		free: make(chan []byte, nBuffers), batches: make(chan batch, nBuffers),
		dirty: d.dirty, tolerant: d.opts.PreDump, noData: d.opts.LazyServe != nil || d.opts.NoPageData}
	if d.parent != nil && d.dirty != nil {
		pd.parent = d.parent.pages
	}
	if pd.noData && pd.parent == nil {
		if sc, err := uffd.OpenScanner(pid); err == nil {
			if _, err := sc.Scan(0, pageSize, uffd.Query{AnyOf: uffd.PagePresent, ReturnMask: uffd.PagePresent}); err == nil {
				pd.sc = sc
				defer sc.Close()
			} else {
				sc.Close() // no PAGEMAP_SCAN (before 6.7): read pagemap
			}
		}
	}
	pd.unlisted = pd.sc != nil && pd.parent == nil && d.dirty == nil
	// The final round of a post-copy migration that leaves the lazy
	// memory unlisted sends the rest (file-backed and shared memory: what
	// the restore fills before the tree runs) with the images, as a
	// plain dump would: the target fills it without asking the source.
	eagerData := pd.unlisted && d.opts.NoPageData && d.opts.PageSink != nil
	if eagerData {
		pd.noData = false
	}
	out, err := d.createPages(fmt.Sprintf("pages-%d.img", pid), eagerData)
	if err != nil {
		return err
	}
	pd.out = out
	var hot [][2]uint64
	if eagerData {
		hot = hotPages(img.core)
	}
	for i := 0; i < nBuffers; i++ {
		pd.free <- chunks.Get().([]byte)
	}
	// The buffers go back to the pool for the tree's next process.
	defer func() {
		for {
			select {
			case b := <-pd.free:
				chunks.Put(b[:readChunk])
			default:
				return
			}
		}
	}()
	werr := make(chan error, 1)
	go func() { werr <- pd.writer() }()

	rerr := func() error {
		defer close(pd.batches)
		for _, v := range img.mm.Vmas {
			if err := ctx.Err(); err != nil {
				return err
			}
			pages, skipZero := dumpable(v.Kind)
			if !pages || slices.Contains(v.VmFlags, "dp") {
				// Droppable memory (MAP_DROPPABLE) is not saved: it
				// comes back empty, as if the kernel had dropped it.
				continue
			}
			if pd.unlisted && lazypages.Unlisted(v) {
				if eagerData {
					// The few pages the restore and the threads touch
					// first go too: the target need not wait for the
					// source to start.
					for _, r := range hot {
						if a, e := max(r[0], v.Start), min(r[1], v.End); a < e {
							if err := pd.pages(v, a, e, false, werr); err != nil {
								return err
							}
						}
					}
				}
				continue
			}
			if err := pd.vma(v, skipZero, werr); err != nil {
				return err
			}
		}
		return nil
	}()
	err = <-werr
	if rerr != nil {
		err = rerr
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	img.pagemap = pd.entries
	img.unlisted = pd.unlisted
	img.gaps, img.parentPages = pd.gaps, pd.parent
	d.stats.MemdumpTimeUs = uint64(time.Since(start).Microseconds())
	d.stats.MemwriteTimeUs = uint64(pd.writeTime.Microseconds())
	d.log.Info("memory dumped", "read", pd.readTime, "write", pd.writeTime, "total", time.Since(start))
	return nil
}

// hotPages returns the pages, as sorted disjoint ranges, that the restore
// touches for the threads (rseq area, robust list, clear_child_tid) and
// that they touch first once they run (the top of the stack, TLS).
func hotPages(core *pb.TaskCore) [][2]uint64 {
	var pages []uint64
	add := func(addr uint64) {
		if addr != 0 {
			pages = append(pages, addr&^(pageSize-1))
		}
	}
	for _, tc := range core.Threads {
		if r := tc.Regs; r != nil {
			add(r.Rsp)
			add(r.Rsp - 512) // what the next calls push
			add(r.FsBase)
		}
		if tc.Rseq != nil {
			add(tc.Rseq.Ptr)
		}
		add(tc.RobustList)
		add(tc.ClearChildTid)
	}
	slices.Sort(pages)
	var out [][2]uint64
	for _, a := range slices.Compact(pages) {
		if n := len(out); n > 0 && out[n-1][1] == a {
			out[n-1][1] += pageSize
		} else {
			out = append(out, [2]uint64{a, a + pageSize})
		}
	}
	return out
}

// createPages opens the pages file locally or on the page server (with
// NoPageData, unless withData, a file that only says its data is there).
func (d *dumper) createPages(name string, withData bool) (*images.PageWriter, error) {
	if d.opts.PageSink == nil {
		if d.opts.Compress {
			return images.CreatePagesZstd(d.opts.ImagesDir, name)
		}
		return images.CreatePages(d.opts.ImagesDir, name)
	}
	if d.opts.NoPageData && !withData {
		// No data to send: a pages file on the other side would only say
		// that the data is there.
		return images.NewPageStream(discard{})
	}
	wc, err := d.opts.PageSink.Create(name)
	if err != nil {
		return nil, fmt.Errorf("page server: %w", err)
	}
	return images.NewPageStream(wc)
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
func (discard) Close() error                { return nil }

// writer writes batches in order and returns their buffers. After an error
// it keeps draining so the reader never blocks.
func (pd *pageDumper) writer() error {
	var err error
	for b := range pd.batches {
		if err == nil {
			t0 := time.Now()
			err = pd.emit(b)
			pd.writeTime += time.Since(t0)
		}
		if b.buf != nil {
			pd.free <- b.buf
		}
	}
	return err
}

// vma dumps one VMA. In an incremental round, a VMA the tracker covers is
// handled by spans: pages outside the dirty set that the parent holds are
// recorded as parent runs without touching them, and only the dirty spans
// are walked page by page. The cost of a round then follows what was
// written, not the size of memory.
func (pd *pageDumper) vma(v *pb.Vma, skipZero bool, werr chan error) error {
	if pd.noData && pd.sc != nil {
		return pd.listPresent(v)
	}
	if pd.parent == nil || !hasFlag(v.VmFlags, "uw") {
		return pd.pages(v, v.Start, v.End, skipZero, werr)
	}
	cur := v.Start
	for cur < v.End {
		ds, ok := pd.dirty.next(cur)
		if !ok || ds.start >= v.End {
			ds = span{v.End, v.End}
		}
		if ds.start > cur {
			// The parent's pages here are recorded when the pagemap is
			// written: with a fragmented parent that is hundreds of
			// thousands of entries, which need not be built while the
			// process is frozen.
			pd.gaps = append(pd.gaps, span{cur, ds.start})
		}
		if ds.start >= v.End {
			break
		}
		a, b := max(ds.start, cur), min(ds.end, v.End)
		if err := pd.pages(v, a, b, skipZero, werr); err != nil {
			return err
		}
		cur = b
	}
	return nil
}

// listPresent records the pages of v that the image lists (present or
// swapped; in a private file mapping, only its anonymous copies) without
// their data, from PAGEMAP_SCAN: runs instead of a pagemap read of every
// page (a 4 GiB process has a million).
func (pd *pageDumper) listPresent(v *pb.Vma) error {
	q := uffd.Query{AnyOf: uffd.PagePresent | uffd.PageSwapped, ReturnMask: uffd.PagePresent | uffd.PageSwapped}
	if v.Kind == KindFilePrivate {
		q.Inverted, q.Mask = uffd.PageFile, uffd.PageFile // not a page of the file
	}
	rs, err := pd.sc.Scan(v.Start, v.End, q)
	if err != nil {
		return fmt.Errorf("listing the pages of %d at %#x-%#x: %w", pd.pid, v.Start, v.End, err)
	}
	if len(rs) == 0 {
		return nil
	}
	items := make([]item, len(rs))
	for i, r := range rs {
		items[i] = item{va: r.Start, kind: itemData, n: (r.End - r.Start) / pageSize}
		pd.stats.PagesScanned += items[i].n
	}
	pd.batches <- batch{items: items, listOnly: true}
	return nil
}

// pages dumps [from, to) of VMA v page by page, as the pagemap shows it.
func (pd *pageDumper) pages(v *pb.Vma, from, to uint64, skipZero bool, werr chan error) error {
	npages := (to - from) / pageSize
	const pmBatch = readChunk / pageSize
	pmBuf := make([]byte, 8*pmBatch)
	fileBacked := v.Kind == KindFilePrivate
	readable := v.Prot&unix.PROT_READ != 0
	for first := uint64(0); first < npages; first += pmBatch {
		n := min(pmBatch, npages-first)
		addr := from + first*pageSize
		b := pmBuf[:8*n]
		if _, err := pd.pm.ReadAt(b, int64(addr/pageSize*8)); err != nil {
			return fmt.Errorf("read pagemap of %d at %#x: %w", pd.pid, addr, err)
		}
		var buf []byte
		select {
		case buf = <-pd.free:
		case err := <-werr:
			werr <- err // leave it for dumpPages
			if err == nil {
				err = fmt.Errorf("page writer stopped early")
			}
			return err
		}
		// Select pages and build read segments of contiguous runs. A VMA
		// the tracker does not cover ("uw" missing) counts as all dirty.
		tracked := pd.parent != nil && hasFlag(v.VmFlags, "uw")
		var segs []compel.Segment
		var items []item
		off := 0
		for i := uint64(0); i < n; i++ {
			e := binary.LittleEndian.Uint64(b[8*i:])
			if e&pmGuard != 0 {
				// Not memory: a marker that faults; made again.
				va := addr + i*pageSize
				if l := len(v.Guards); l > 0 && v.Guards[l-1] == va {
					v.Guards[l-1] = va + pageSize
				} else {
					v.Guards = append(v.Guards, va, va+pageSize)
				}
				continue
			}
			if e&pmUffdWP != 0 && v.UffdModes&uffdWP != 0 {
				va := addr + i*pageSize
				if l := len(v.UffdWp); l > 0 && v.UffdWp[l-1] == va {
					v.UffdWp[l-1] = va + pageSize
				} else {
					v.UffdWp = append(v.UffdWp, va, va+pageSize)
				}
			}
			want := e&pmSwapped != 0 || e&pmPresent != 0 && (!fileBacked || e&pmFileShared == 0)
			pd.stats.PagesScanned++
			if !want {
				continue
			}
			va := addr + i*pageSize
			if tracked && !pd.dirty.has(va) && pd.parent.has(va) {
				items = append(items, item{va: va, kind: itemParent, n: 1})
				continue
			}
			if l := len(segs); l > 0 && segs[l-1].Addr+uint64(len(segs[l-1].Local)) == va {
				segs[l-1].Local = buf[off-len(segs[l-1].Local) : off+pageSize]
			} else {
				segs = append(segs, compel.Segment{Addr: va, Local: buf[off : off+pageSize]})
			}
			items = append(items, item{va: va, kind: itemData})
			off += pageSize
		}
		if len(items) == 0 {
			pd.free <- buf
			continue
		}
		if pd.noData {
			pd.free <- buf
			pd.batches <- batch{items: items, listOnly: true}
			continue
		}
		t0 := time.Now()
		failed, err := pd.read(segs, readable)
		if err != nil {
			pd.free <- buf
			return err
		}
		for i := range items {
			if items[i].kind == itemData && failed.has(items[i].va) {
				items[i].kind = itemSkip
			}
		}
		pd.readTime += time.Since(t0)
		pd.batches <- batch{buf: buf, items: items, skipZero: skipZero}
	}
	return nil
}

func hasFlag(flags []string, f string) bool {
	for _, x := range flags {
		if x == f {
			return true
		}
	}
	return false
}

// read fills the segments; while the process runs (tolerant) segments
// that cannot be read any more are returned as failed instead.
func (pd *pageDumper) read(segs []compel.Segment, readable bool) (failed *regionSet, err error) {
	if readable {
		if err := compel.ReadMem(pd.pid, segs); err == nil {
			return nil, nil
		}
	}
	// Unreadable VMAs (PROT_NONE with data): /proc/PID/mem reads with
	// force. It also isolates the segments that fail.
	for _, s := range segs {
		if _, err := pd.mem.ReadAt(s.Local, int64(s.Addr)); err != nil {
			if !pd.tolerant {
				return nil, fmt.Errorf("read memory of %d at %#x: %w", pd.pid, s.Addr, err)
			}
			if failed == nil {
				failed = &regionSet{}
			}
			failed.spans = append(failed.spans, span{s.Addr, s.Addr + uint64(len(s.Local))})
		}
	}
	return failed, nil
}

// emit writes a batch's pages, leaving out zero pages when allowed, and
// records pagemap entries.
func (pd *pageDumper) emit(b batch) error {
	var bufs [][]byte
	runStart := -1 // buffer page index of the pending write run
	flush := func(end int) {
		if runStart >= 0 {
			bufs = append(bufs, b.buf[runStart*pageSize:end*pageSize])
			runStart = -1
		}
	}
	record := func(va uint64, n uint64, parent bool) {
		if l := len(pd.entries); l > 0 {
			last := &pd.entries[l-1]
			if last.InParent == parent && last.End() == va && uint64(last.NrPages)+n < 1<<31 {
				last.NrPages += uint32(n)
				return
			}
		}
		for n > 0 { // entries count pages in 32 bits
			c := min(n, 1<<30)
			pd.entries = append(pd.entries, images.PageEntry{Vaddr: va, NrPages: uint32(c), InParent: parent})
			va, n = va+c*pageSize, n-c
		}
	}
	if b.listOnly { // pagemap only (dump --lazy-pages)
		for _, it := range b.items {
			switch it.kind {
			case itemData:
				n := max(it.n, 1)
				record(it.va, n, false)
				pd.stats.PagesWritten += n
			case itemParent:
				pd.stats.PagesSkippedParent += it.n
				record(it.va, it.n, true)
			}
		}
		return nil
	}
	bi := 0 // next page of the buffer
	for _, it := range b.items {
		switch it.kind {
		case itemParent:
			pd.stats.PagesSkippedParent += it.n
			record(it.va, it.n, true)
			continue
		case itemSkip:
			flush(bi)
			bi++
			continue
		}
		page := b.buf[bi*pageSize : (bi+1)*pageSize]
		if b.skipZero && bytes.Equal(page, zeroPage) {
			pd.stats.PagesZero++
			flush(bi)
			bi++
			continue
		}
		if runStart < 0 {
			runStart = bi
		}
		bi++
		pd.stats.PagesWritten++
		record(it.va, 1, false)
	}
	flush(bi)
	n, err := pd.out.WriteVec(bufs)
	pd.stats.BytesWritten += uint64(n)
	return err
}

// withParentRuns merges into entries (both in address order) one parent
// run for each gap where the parent has pages, and counts those pages. A
// run goes from the parent's first page in its gap to its last, with
// holes where the parent lacks pages: a fragmented parent's hundreds of
// thousands of runs take one entry per gap, which the source writes and
// the target reads while the process is stopped.
func withParentRuns(entries []images.PageEntry, gaps []span, parent *regionSet, stats *pb.DumpStats) []images.PageEntry {
	if len(gaps) == 0 {
		return entries
	}
	out := make([]images.PageEntry, 0, len(entries)+len(gaps))
	i := 0
	for _, g := range gaps {
		in := parent.within(g.start, g.end)
		if len(in) == 0 {
			continue
		}
		for i < len(entries) && entries[i].Vaddr < g.start {
			out = append(out, entries[i])
			i++
		}
		for _, sp := range in {
			stats.PagesSkippedParent += (sp.end - sp.start) / pageSize
		}
		// in's spans are apart (a regionSet joins touching ones): more
		// than one leaves holes.
		start, end, holes := in[0].start, in[len(in)-1].end, len(in) > 1
		for va := start; va < end; {
			c := min((end-va)/pageSize, 1<<30) // entries count pages in 32 bits
			out = append(out, images.PageEntry{Vaddr: va, NrPages: uint32(c), InParent: true, Holes: holes})
			va += c * pageSize
		}
	}
	return append(out, entries[i:]...)
}
