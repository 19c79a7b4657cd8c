package dumpcore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/vmflags"
	"github.com/ferrycr/ferry/uffd"
)

// regionSet answers "is this page in the set" for sorted, disjoint spans.
type regionSet struct{ spans []span }

type span struct{ start, end uint64 }

func newRegionSet(rs []uffd.Region) *regionSet {
	s := &regionSet{}
	for _, r := range rs {
		s.spans = append(s.spans, span{r.Start, r.End})
	}
	s.normalize()
	return s
}

func (s *regionSet) normalize() {
	sort.Slice(s.spans, func(i, j int) bool { return s.spans[i].start < s.spans[j].start })
	var out []span
	for _, sp := range s.spans {
		if l := len(out); l > 0 && sp.start <= out[l-1].end {
			out[l-1].end = max(out[l-1].end, sp.end)
			continue
		}
		out = append(out, sp)
	}
	s.spans = out
}

func (s *regionSet) has(va uint64) bool {
	if s == nil {
		return false
	}
	i := sort.Search(len(s.spans), func(i int) bool { return s.spans[i].end > va })
	return i < len(s.spans) && s.spans[i].start <= va
}

// next returns the first span ending after va (ok false if none).
func (s *regionSet) next(va uint64) (span, bool) {
	if s == nil {
		return span{}, false
	}
	i := sort.Search(len(s.spans), func(i int) bool { return s.spans[i].end > va })
	if i == len(s.spans) {
		return span{}, false
	}
	return s.spans[i], true
}

// within returns the parts of the set inside [start, end). The result
// shares the set's storage except for its clipped ends: an incremental
// round calls it for every gap between dirty spans, over parent sets of
// hundreds of thousands of spans.
func (s *regionSet) within(start, end uint64) []span {
	if s == nil || start >= end {
		return nil
	}
	i := sort.Search(len(s.spans), func(i int) bool { return s.spans[i].end > start })
	j := i + sort.Search(len(s.spans)-i, func(k int) bool { return s.spans[i+k].start >= end })
	if i >= j {
		return nil
	}
	out := s.spans[i:j:j]
	if out[0].start < start || out[len(out)-1].end > end {
		out = append([]span(nil), out...)
		out[0].start = max(out[0].start, start)
		out[len(out)-1].end = min(out[len(out)-1].end, end)
	}
	return out
}

func (s *regionSet) pages() uint64 {
	if s == nil {
		return 0
	}
	var n uint64
	for _, sp := range s.spans {
		n += (sp.end - sp.start) / pageSize
	}
	return n
}

// parentImages is what a dump needs from --prev-images-dir.
type parentImages struct {
	dir   string // as given, relative to the images dir or absolute
	inv   *pb.Inventory
	pages *regionSet // every page the parent chain holds for the process
}

// trackerOf returns the fd and inode of the tracker the parent round left
// in process pid, the tree's root or another (0 if none). The root's is
// the inventory's own (its RootPid may be the tree's PID, not ferry's);
// the others' are listed by ferry's PIDs.
func (p *parentImages) trackerOf(pid int, root bool) (int, uint64) {
	if root {
		return int(p.inv.TrackerFd), p.inv.TrackerIno
	}
	for _, t := range p.inv.Trackers {
		if int(t.Pid) == pid {
			return int(t.Fd), t.Ino
		}
	}
	return 0, 0
}

// forProcess returns the parent images of another process of the tree
// (root's p), or nil if the parent round did not hold that process.
func (p *parentImages) forProcess(imagesDir string, pid int) *parentImages {
	path := p.dir
	if !filepath.IsAbs(path) {
		path = filepath.Join(imagesDir, p.dir)
	}
	pages, err := images.PagemapPages(path, int32(pid))
	if err != nil {
		return nil
	}
	return &parentImages{dir: p.dir, inv: p.inv, pages: pageSet(pages)}
}

// pageSet makes the regionSet of pages (in address order, disjoint, as
// a pagemap holds them), joining adjacent ranges.
func pageSet(pages [][2]uint64) *regionSet {
	s := &regionSet{spans: make([]span, 0, len(pages))}
	for _, r := range pages {
		if n := len(s.spans); n > 0 && s.spans[n-1].end == r[0] {
			s.spans[n-1].end = r[1]
			continue
		}
		s.spans = append(s.spans, span{r[0], r[1]})
	}
	return s
}

// loadParent reads the parent image set of an incremental dump of pid
// (its PID as the tree sees it: imagePid).
func loadParent(imagesDir, prev string, pid int) (*parentImages, error) {
	path := prev
	if !filepath.IsAbs(path) {
		path = filepath.Join(imagesDir, prev)
	}
	p := &parentImages{dir: prev, inv: &pb.Inventory{}}
	if err := images.ReadOne(path, "inventory.img", images.KindInventory, p.inv); err != nil {
		return nil, fmt.Errorf("--prev-images-dir: %w", err)
	}
	if int(p.inv.RootPid) != pid {
		return nil, fmt.Errorf("--prev-images-dir %s holds process %d, not %d", prev, p.inv.RootPid, pid)
	}
	pages, err := images.PagemapPages(path, int32(pid))
	if err != nil {
		return nil, fmt.Errorf("--prev-images-dir: %w", err)
	}
	p.pages = pageSet(pages)
	return p, nil
}

// takeParkedTracker takes back the userfaultfd an earlier round left at
// fd in the target, if it is still there and still the same file.
func takeParkedTracker(pid, fd int, ino uint64) (*uffd.FD, error) {
	if fd <= 0 {
		return nil, nil
	}
	link := proc.Path(pid, "fd/"+strconv.Itoa(fd))
	target, err := os.Readlink(link)
	if err != nil || target != "anon_inode:[userfaultfd]" {
		return nil, nil // closed or replaced by the program
	}
	info, err := proc.ReadFdInfo(pid, fd)
	if err != nil || info.Ino != ino {
		return nil, nil
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	dup, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return nil, os.NewSyscallError("pidfd_getfd", err)
	}
	unix.CloseOnExec(dup)
	return uffd.AdoptNoHandshake(dup, trackFeatures), nil
}

// nofileSoft returns the soft RLIMIT_NOFILE of pid.
func nofileSoft(pid int) uint64 {
	lims, err := proc.ReadLimits(pid)
	if err == nil {
		for _, l := range lims {
			if l.Resource == unix.RLIMIT_NOFILE {
				return l.Cur
			}
		}
	}
	return 1024
}

// parkedFdHint is where the tracker is parked in the target: near the top
// of the fd table the process already has (the kernel sizes it to a power
// of two, at least 64), out of the way of its low fds. Growing the table
// instead would cost the freeze an RCU grace period (~10 ms here) in a
// multi-threaded process, and a soft limit of a million fds would make the
// table megabytes large.
func parkedFdHint(pid int) uint64 {
	var highest uint64
	if fds, err := openFds(pid); err == nil && len(fds) > 0 {
		highest = uint64(fds[len(fds)-1])
	}
	size := uint64(64)
	for size <= highest {
		size *= 2
	}
	hint := size - 8
	if hint <= highest {
		hint = highest + 1 // F_DUPFD picks the lowest free fd from here
	}
	if soft := nofileSoft(pid); hint >= soft {
		hint = soft / 2
	}
	return hint
}

// adoptStaleTracker takes over a dirty tracker an earlier ferry round
// parked in the frozen process (nil if there is none); any further ones
// are closed.
func (d *dumper) adoptStaleTracker() (*Tracker, error) {
	pid := d.opts.Pid
	ents, err := os.ReadDir(proc.Path(pid, "fd"))
	if err != nil {
		return nil, err
	}
	var t *Tracker
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		info, err := proc.ReadFdInfo(pid, fd)
		if err != nil || !isFerryTracker(pid, fd, info) {
			continue
		}
		if t != nil {
			d.log.Info("removing a dirty tracker an earlier round left in the process", "fd", fd)
			if _, err := d.task(pid).Syscall(unix.SYS_CLOSE, uint64(fd)); err != nil {
				return nil, fmt.Errorf("closing the stale dirty tracker at fd %d of %d: %w", fd, pid, err)
			}
			continue
		}
		u, err := takeParkedTracker(pid, fd, info.Ino)
		if err != nil || u == nil {
			return nil, err
		}
		d.log.Info("adopting the dirty tracker an earlier round left in the process", "fd", fd)
		t = &Tracker{pid: pid, u: u, features: trackFeatures, log: d.log, parked: fd, parkedIno: info.Ino}
		if t.sc, err = uffd.OpenScanner(pid); err != nil {
			u.Close()
			return nil, err
		}
	}
	return t, nil
}

func isUffdLink(target string) bool { return strings.HasPrefix(target, "anon_inode:[userfaultfd]") }

// setupTracking runs while the tree is frozen. With a parent image set it
// takes back the tracker the parent round parked in the process and scans
// what was written since (re-arming it); for pre-dump and --track-mem
// without a usable parent tracker it injects and parks a new one, arming
// every VMA, and the round copies everything.
func (d *dumper) setupTracking() error {
	pid := d.opts.Pid
	if p := d.parent; p != nil {
		tfd, tino := p.trackerOf(pid, d.t == nil || pid == d.t.root)
		u, err := takeParkedTracker(pid, tfd, tino)
		if err != nil {
			return err
		}
		if u != nil {
			t := &Tracker{pid: pid, u: u, features: trackFeatures, log: d.log, parked: tfd, parkedIno: tino}
			if t.sc, err = uffd.OpenScanner(pid); err != nil {
				u.Close()
				return err
			}
			d.tracker = t
			t0 := time.Now()
			written, fresh, err := t.Dirty()
			if err != nil {
				return err
			}
			d.log.Debug("dirty scan", "took", time.Since(t0))
			d.dirty = newRegionSet(append(written, fresh...))
			d.log.Info("incremental round", "parent", p.dir, "written pages", d.dirty.pages())
			return nil
		}
		d.log.Warn("the dirty tracker of the previous round is gone (the process closed it?); copying all memory",
			"parent", p.dir)
	}
	if !d.opts.PreDump && !d.opts.TrackMem {
		return nil
	}
	// A tracker an earlier round left behind still holds the registration
	// of every VMA: a new one could register none of them. It is adopted
	// instead (closing it would unprotect every page while frozen). Its
	// protection tells nothing this round can use, so everything is
	// copied, but a scan re-arms it.
	if t, err := d.adoptStaleTracker(); err != nil || t != nil {
		if err != nil {
			return err
		}
		d.tracker = t
		if d.opts.PreDump {
			d.armAfterResume = true
			return nil
		}
		_, _, err := t.Dirty()
		return err
	}
	fd, features, parked, err := injectUffd(d, pid, true)
	if err != nil {
		if errors.Is(err, ErrNoTracker) {
			d.log.Warn("no dirty tracking for this process; later rounds copy all memory", "err", err)
			return nil
		}
		return err
	}
	t := &Tracker{pid: pid, u: uffd.AdoptNoHandshake(fd, features), features: features, log: d.log, parked: parked}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.u.Close()
		return os.NewSyscallError("fstat", err)
	}
	t.parkedIno = st.Ino
	if t.sc, err = uffd.OpenScanner(pid); err != nil {
		t.u.Close()
		return err
	}
	d.tracker = t
	if d.opts.PreDump {
		// Arm after the process resumes: write-protecting costs ~20 ms
		// per GiB, and pages written before arming are copied after it.
		d.armAfterResume = true
		return nil
	}
	vmas, err := vmflags.Read(pid)
	if err != nil {
		return err
	}
	_, err = t.armNew(vmas)
	return err
}

// preDump saves the tree's memory for a later incremental dump: the
// VMAs are read while frozen, then the tree resumes and its pages are
// copied while it runs (pages written meanwhile are caught by the next
// round's scan).
func (t *tree) preDump(ctx context.Context, start, frozenAt time.Time) (*Result, error) {
	// Only the trackers needed the freeze (taken, scanned and re-armed,
	// or injected): the tree runs again before its VMAs are read (smaps
	// walks page tables), armed and copied. A VMA that appears meanwhile
	// is copied now if seen, and reported fresh by the next round anyway.
	t.resume(false)
	released := time.Now()
	t.stats.FrozenTimeUs = uint64(released.Sub(frozenAt).Microseconds())
	imgs := make([]*imageSet, 0, len(t.procs))
	procs := make([]*dumper, 0, len(t.procs))
	for _, d := range t.procs {
		img, err := d.preDumpMemory(ctx)
		if err != nil && d.opts.Pid != t.root && exited(d.opts.Pid) {
			// The tree runs: a child may exit before its memory is read
			// (a shell's short-lived command). Its memory is of no use
			// to the next round; the final dump does not have it.
			t.log.Info("a process exited during the pre-dump: left out of the round", "pid", d.opts.Pid, "err", err)
			continue
		} else if err != nil {
			return nil, err
		}
		imgs, procs = append(imgs, img), append(procs, d)
	}
	root := t.procs[0]
	inv, err := root.inventory(imgs[0])
	if err != nil {
		return nil, err
	}
	// The PIDs the tree sees (trackers keep ferry's: they are found in
	// the running processes).
	inv.RootPid, inv.PidNs = t.vpid(t.root), t.vpids != nil
	dir := t.opts.ImagesDir
	if err := images.WriteAll(dir, images.InventoryName, images.KindInventory, inv); err != nil {
		return nil, err
	}
	for i, d := range procs {
		if err := d.writePagemap(imgs[i]); err != nil {
			return nil, err
		}
	}
	if err := root.finishSink(); err != nil {
		return nil, err
	}
	t.stats.TotalTimeUs = uint64(time.Since(start).Microseconds())
	if err := images.WriteAll(dir, images.StatsDumpName, images.KindStats, &pb.Stats{Dump: t.stats}); err != nil {
		return nil, err
	}
	t.log.Info("pre-dump finished", "pid", t.root, "processes", len(procs), "frozen", released.Sub(frozenAt),
		"pages written", t.stats.PagesWritten, "pages in parent", t.stats.PagesSkippedParent)
	return &Result{Stats: t.stats}, nil
}

// exited tells whether process pid is gone, a zombie, or on its way to
// be one: exit releases the memory (reading it fails with ESRCH) before
// the process turns zombie, with PF_EXITING set from the start.
func exited(pid int) bool {
	const pfExiting = 0x4 // include/linux/sched.h
	st, err := proc.ReadStat(pid)
	return err != nil || st.State == 'Z' || st.State == 'X' || st.Flags&pfExiting != 0
}

// preDumpMemory copies the memory of one process of a pre-dump.
func (d *dumper) preDumpMemory(ctx context.Context) (*imageSet, error) {
	img := &imageSet{files: newFileTable(d.opts.GhostLimit), mm: &pb.MmCore{Pid: d.t.vpid(d.opts.Pid)}}
	if err := d.collectVmas(img); err != nil {
		return nil, err
	}
	if d.armAfterResume {
		// Before copying: what is written from now on is tracked. (A new
		// tracker registers every VMA; an adopted one re-protects what
		// was written and registers VMAs that are new.)
		if _, _, err := d.tracker.Dirty(); err != nil {
			return nil, err
		}
	}
	if err := d.dumpPages(ctx, img); err != nil {
		return nil, err
	}
	return img, nil
}
