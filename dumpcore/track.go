package dumpcore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
	"github.com/ferrycr/ferry/internal/vmflags"
	"github.com/ferrycr/ferry/uffd"
)

// Tracker finds the pages a running process writes, with a userfaultfd in
// asynchronous write-protect mode and PAGEMAP_SCAN (DESIGN.md, "dirty
// tracking for pre-dump"):
//
//	freeze ~0.4 ms: remote userfaultfd() + UFFDIO_API(WP_ASYNC) in the
//	    target, pidfd_getfd it to ferry, close it in the target, resume
//	ferry, target running: UFFDIO_REGISTER(WP) + UFFDIO_WRITEPROTECT
//	    every writable private VMA
//	Dirty(): PAGEMAP_SCAN(WRITTEN, WP_MATCHING) per VMA = written since
//	    the last call, re-protected in the same pass; VMAs that appeared
//	    since (no "uw" in smaps) are registered and reported whole.
//
// The target does not notice: write faults on protected pages are
// resolved by the kernel (~1 µs each) and no message is queued.
type Tracker struct {
	pid      int
	u        *uffd.FD
	sc       *uffd.Scanner
	features uint64
	log      *slog.Logger
	// parked is the fd number of the tracker's copy kept inside the
	// target (0: none), parkedIno its inode.
	parked    int
	parkedIno uint64
}

// Wanted userfaultfd features: asynchronous WP, and markers on unpopulated
// ptes so that first writes to untouched pages count as writes.
const trackFeatures = uffd.FeatureWPAsync | uffd.FeatureWPUnpopulated

// ErrNoTracker reports that the kernel or the target cannot be tracked
// with userfaultfd (callers fall back to copying everything).
var ErrNoTracker = errors.New("userfaultfd dirty tracking unavailable")

// StartTracking arms dirty tracking on pid. The process is frozen only
// while the userfaultfd is created inside it.
func StartTracking(pid int, log *slog.Logger) (*Tracker, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &dumper{opts: Options{Pid: pid, Timeout: 10 * time.Second}, log: log, stats: nil}
	var fd int
	var features uint64
	tr := ptrace.NewThread()
	defer tr.Close()
	err := tr.Do(func() error {
		return whileStopped(d, func() error {
			var err error
			fd, features, _, err = injectUffd(d, pid, false)
			return err
		})
	})
	if err != nil {
		return nil, err
	}
	t := &Tracker{pid: pid, u: uffd.AdoptNoHandshake(fd, features), features: features, log: log}
	if t.sc, err = uffd.OpenScanner(pid); err != nil {
		t.u.Close()
		return nil, err
	}
	vmas, err := vmflags.Read(pid)
	if err != nil {
		t.Close()
		return nil, err
	}
	if _, err := t.armNew(vmas); err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

// whileStopped freezes d's process, runs fn with its threads prepared for
// remote syscalls, and resumes it. It runs on a tracer thread.
func whileStopped(d *dumper, fn func() error) error {
	threads, err := freeze(d.opts.Pid, time.Now().Add(d.opts.Timeout))
	if err != nil {
		return err
	}
	d.threads = threads
	defer d.resumeThreads(false)
	if err := d.prepare(); err != nil {
		return err
	}
	return fn()
}

// disarmChunk is how much of a VMA one UFFDIO_UNREGISTER drops: the call
// clears write protection from every page under the process's mmap lock
// (about 20 ms per GiB), so it goes in steps that stall a running process
// only briefly.
const disarmChunk = 64 << 20

// disarm drops every registration u holds in pid's VMAs, in steps, while
// the process runs; closing an emptied userfaultfd is then instant.
func disarm(pid int, u *uffd.FD, log *slog.Logger) error {
	vmas, err := proc.ReadMaps(pid)
	if err != nil {
		return err
	}
	for i := range vmas {
		v := &vmas[i]
		if !trackable(v) {
			continue
		}
		for a := v.Start; a < v.End; a += disarmChunk {
			if err := u.Unregister(a, min(disarmChunk, v.End-a)); err != nil {
				// Not ours (the program's own userfaultfd), or gone.
				log.Debug("unregister", "at", fmt.Sprintf("%#x", a), "err", err)
				break
			}
		}
	}
	return nil
}

// removeTrackers takes ferry's dirty trackers at fds out of the running
// process: their registrations are dropped while it runs (disarm), then a
// stop of about a millisecond closes the fds. It runs on a tracer thread.
func removeTrackers(opts Options, log *slog.Logger, fds []int) error {
	pid := opts.Pid
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	for _, fd := range fds {
		dup, err := unix.PidfdGetfd(pidfd, fd, 0)
		if err != nil {
			return fmt.Errorf("dirty tracker at fd %d of %d: %w", fd, pid, os.NewSyscallError("pidfd_getfd", err))
		}
		u := uffd.AdoptNoHandshake(dup, trackFeatures)
		err = disarm(pid, u, log)
		u.Close()
		if err != nil {
			return err
		}
	}
	d := &dumper{opts: opts, log: log}
	return whileStopped(d, func() error {
		for _, fd := range fds {
			if l, _ := os.Readlink(proc.Path(pid, "fd/"+strconv.Itoa(fd))); !isUffdLink(l) {
				continue // closed by the program meanwhile
			}
			log.Debug("removing a dirty tracker", "pid", pid, "fd", fd)
			if _, err := d.task(pid).Syscall(unix.SYS_CLOSE, uint64(fd)); err != nil {
				return fmt.Errorf("closing the dirty tracker at fd %d of %d: %w", fd, pid, err)
			}
		}
		return nil
	})
}

// injectUffd creates a userfaultfd inside the frozen target, performs the
// API handshake there, and duplicates it to ferry. With park, the target
// keeps it at a high fd number (returned) so that tracking outlives this
// ferry process; otherwise the target's copy is closed.
// Preconditions: d's threads are frozen and prepared, on the tracer thread.
func injectUffd(d *dumper, pid int, park bool) (fd int, features uint64, parked int, err error) {
	main := d.task(pid)
	sc, err := mapScratch(main, pid)
	if err != nil {
		return -1, 0, 0, err
	}
	defer sc.unmap(main)
	rfd, err := main.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK)
	if errors.Is(err, unix.EPERM) {
		// Unprivileged target with vm.unprivileged_userfaultfd=0.
		rfd, err = main.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK|uffd.UserModeOnly)
	}
	if err != nil {
		return -1, 0, 0, fmt.Errorf("%w: %v", ErrNoTracker, err)
	}
	defer main.Syscall(unix.SYS_CLOSE, rfd)
	src := rfd
	if park {
		pfd, err := main.Syscall(unix.SYS_FCNTL, rfd, unix.F_DUPFD_CLOEXEC, parkedFdHint(pid))
		if err != nil {
			return -1, 0, 0, fmt.Errorf("park the tracker in %d: %w", pid, err)
		}
		src, parked = pfd, int(pfd)
	}
	api := make([]byte, 24)
	binary.LittleEndian.PutUint64(api[0:], uffd.API)
	binary.LittleEndian.PutUint64(api[8:], trackFeatures)
	if err := sc.write(0, api); err != nil {
		return -1, 0, 0, err
	}
	const uffdioAPI = 0xC018AA3F
	if _, err := main.Syscall(unix.SYS_IOCTL, rfd, uffdioAPI, sc.addr); err != nil {
		return -1, 0, 0, fmt.Errorf("%w: UFFDIO_API in the target: %v", ErrNoTracker, err)
	}
	out, err := sc.read(0, 24)
	if err != nil {
		return -1, 0, 0, err
	}
	features = binary.LittleEndian.Uint64(out[8:])
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return -1, 0, 0, os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	fd, err = unix.PidfdGetfd(pidfd, int(src), 0)
	if err != nil {
		return -1, 0, 0, os.NewSyscallError("pidfd_getfd", err)
	}
	unix.CloseOnExec(fd)
	return fd, features, parked, nil
}

// trackable reports whether a VMA's writes must be tracked: writable,
// private, ordinary memory.
func trackable(v *proc.Vma) bool {
	if v.Perms[1] != 'w' || v.Perms[3] != 'p' || proc.IsSpecialMapping(v.Name) {
		return false
	}
	return true
}

// armNew registers and write-protects every trackable VMA of vmas not yet
// registered (from smaps: no "uw" flag; from Dirty: the scan said so) and
// returns them: everything in them counts as written.
func (t *Tracker) armNew(vmas []proc.Vma) ([]uffd.Region, error) {
	var fresh []uffd.Region
	for i := range vmas {
		v := &vmas[i]
		if !trackable(v) || v.Has("uw") {
			continue
		}
		fresh = append(fresh, uffd.Region{Start: v.Start, End: v.End, Categories: uffd.PageWritten})
		if _, err := t.u.Register(v.Start, v.Size(), uffd.RegisterWP); err != nil {
			// A VMA the kernel will not track: it stays always dirty.
			t.log.Debug("VMA not tracked", "start", fmt.Sprintf("%#x", v.Start), "err", err)
			continue
		}
		if err := t.u.WriteProtect(v.Start, v.Size(), true); err != nil {
			return nil, err
		}
	}
	return fresh, nil
}

// Dirty returns the pages written since the previous call (or since
// StartTracking), and re-arms them. fresh lists VMAs that appeared since
// (mmap, mremap, a split that lost the registration): all of their pages
// count as written. VMAs come from /proc/PID/maps (smaps would walk every
// page table for its counters); whether one is registered is answered by
// the scan itself, which fails with EPERM on an unregistered VMA under
// PM_SCAN_CHECK_WPASYNC. VMAs that grew (brk) or were split (mprotect)
// keep their registration and are scanned whole.
func (t *Tracker) Dirty() (written, fresh []uffd.Region, err error) {
	vmas, err := proc.ReadMaps(t.pid)
	if err != nil {
		return nil, nil, err
	}
	var unarmed []proc.Vma
	for i := range vmas {
		v := &vmas[i]
		if !trackable(v) {
			continue
		}
		rs, err := t.sc.Scan(v.Start, v.End, uffd.Written)
		if errors.Is(err, unix.EPERM) && len(rs) == 0 {
			unarmed = append(unarmed, *v)
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		if n := uffd.Pages(rs); n > 0 {
			t.log.Debug("written", "vma", fmt.Sprintf("%#x-%#x", v.Start, v.End), "pages", n)
		}
		written = append(written, rs...)
	}
	for _, v := range unarmed {
		t.log.Debug("VMA not armed: all of it counts as written", "vma", fmt.Sprintf("%#x-%#x", v.Start, v.End), "name", v.Name)
	}
	fresh, err = t.armNew(unarmed)
	return written, fresh, err
}

// Features returns the userfaultfd features the target's handshake got.
func (t *Tracker) Features() uint64 { return t.features }

// Close stops tracking (closing the userfaultfd unregisters everything).
func (t *Tracker) Close() error {
	if t.sc != nil {
		t.sc.Close()
	}
	return t.u.Close()
}

// ReleaseTrackers unregisters, in process pid, the address space the dirty
// trackers that pre-dump rounds left in it watch: its pages are no longer
// write-protected (a migration rolled back before its final round; no
// later round will read them). Each tracker's descriptor stays in the
// process, idle, until its next dump removes it. A process that has a
// userfaultfd of its own is left as it is.
func ReleaseTrackers(pid int) error {
	fds, err := openFds(pid)
	if err != nil {
		return err
	}
	var trackers []int
	for _, fd := range fds {
		target, _ := os.Readlink(proc.Path(pid, "fd/"+strconv.Itoa(fd)))
		if target != "anon_inode:[userfaultfd]" {
			continue
		}
		if info, err := proc.ReadFdInfo(pid, fd); err == nil && isFerryTracker(pid, fd, info) {
			trackers = append(trackers, fd)
			continue
		}
		// The program's own: which areas it watches cannot be told
		// apart from ours, so leave everything as it is.
		return nil
	}
	if len(trackers) == 0 {
		return nil
	}
	vmas, err := proc.ReadMaps(pid)
	if err != nil {
		return err
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	for _, fd := range trackers {
		dup, err := unix.PidfdGetfd(pidfd, fd, 0)
		if err != nil {
			return fmt.Errorf("tracker fd %d of %d: %w", fd, pid, os.NewSyscallError("pidfd_getfd", err))
		}
		u := uffd.AdoptNoHandshake(dup, trackFeatures)
		for _, v := range vmas {
			// Areas it does not watch (or that another userfaultfd
			// watches) refuse: nothing to undo there.
			u.Unregister(v.Start, v.End-v.Start)
		}
		u.Close()
	}
	return nil
}
