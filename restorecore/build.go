package restorecore

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
	"github.com/ferrycr/ferry/uffd"
)

// Trampoline region: one code page with "syscall; int3", then scratch
// memory for syscall arguments, with a small stack at its top.
const (
	trampSize   = 256 << 10
	scratchOff  = 4096
	scratchSize = trampSize - scratchOff - 16<<10
)

var trampCode = []byte{0x0f, 0x05, 0xcc} // syscall; int3

// builder restores one process.
type builder struct {
	r *restorer
	p *procImage
	// sharedSeccomp: the seccomp filters every thread begins with,
	// installed before the threads were made (restoreSeccomp).
	sharedSeccomp []uint32
	// pid is the process's PID here (in ferry's PID namespace); its
	// images' (b.p.pstree.Pid) is the one it sees itself.
	pid int
	// ctty is set while files are restored, taken once the session exists.
	ctty *ctty

	main    *compel.Task
	threads []*compel.Task // main first
	tramp   uint64

	// objFds maps a files.img id to the fd holding it in the target while
	// fds are being placed.
	objFds map[uint32]int
	// aioIDs are the AIO rings made (makeAioRing) with their contexts' ids.
	aioIDs []aioID
	// ferryPidfd is the process's pidfd of ferry while it takes files
	// ferry holds (take), 0 when none.
	ferryPidfd uint64
	// uffd is ferry's copy of the process's own userfaultfd until its
	// memory is registered with it (registerUffd).
	uffd *uffd.FD
	// trapIgnored: an ignored SIGTRAP, set by finish after the last
	// int3 of a remote call.
	trapIgnored *pb.SigAction
}

func (b *builder) tids() []int {
	out := make([]int, len(b.threads))
	for i, t := range b.threads {
		out[i] = t.Tid
	}
	return out
}

func (b *builder) scratch() uint64 { return b.tramp + scratchOff }

// put writes data into the scratch area at off and returns its address.
func (b *builder) put(off uint64, data []byte) (uint64, error) {
	if off+uint64(len(data)) > scratchSize {
		return 0, fmt.Errorf("scratch overflow (%d bytes at %d)", len(data), off)
	}
	addr := b.scratch() + off
	return addr, compel.WriteMem(b.pid, []compel.Segment{{Addr: addr, Local: data}})
}

func (b *builder) putString(off uint64, s string) (uint64, error) {
	return b.put(off, append([]byte(s), 0))
}

func (b *builder) sys(nr uintptr, args ...uint64) (uint64, error) {
	return b.main.Syscall(nr, args...)
}

func (b *builder) build(ctx context.Context) error {
	regs, err := ptrace.GetRegs(b.pid)
	if err != nil {
		return err
	}
	b.main = &compel.Task{Tid: b.pid, Regs: regs, Gadget: seedGadget, Int3: true}
	b.threads = []*compel.Task{b.main}
	steps := []struct {
		name string
		f    func() error
	}{
		{"trampoline", b.setupTrampoline},
		{"vdso", b.moveVdso},
		{"memory", b.restoreMemory},
		{"lazy pages", b.setupLazy},
		{"mm", b.restoreMm},
		{"rlimits", b.restoreRlimits},
		{"cwd", b.restoreCwd},
		{"files", b.restoreFiles},
		{"task", b.restoreTask},
		{"signals", b.restoreSigactions},
		// Files taken from ferry, then into the tree's user namespace
		// while the process has one thread.
		{"user namespace", b.enterUserNs},
		// Seccomp filters the threads share, before they are made: they
		// inherit them, as they did. (Filters do not apply while ferry
		// traces the process: ptrace.OSuspendSeccomp.)
		{"seccomp", b.restoreSeccomp},
		// Threads before timers: a timer may signal one of them.
		{"threads", b.restoreThreads},
		{"timers", b.restoreTimers},
		{"pending signals", b.restorePending},
		{"creds", b.restoreCreds},
		// Last: from here faults in that memory go to the process's
		// own handler.
		{"userfaultfd", b.registerUffd},
	}
	for _, s := range steps {
		if err := ctx.Err(); err != nil {
			return err
		}
		t0 := time.Now()
		if err := s.f(); err != nil {
			return fmt.Errorf("restore %d: %s: %w", b.pid, s.name, err)
		}
		b.r.log.Debug("restore step", "pid", b.pid, "step", s.name, "took", time.Since(t0))
	}
	return nil
}

// ghostPath returns the stand-in for deleted file f, made on first use.
func (b *builder) ghostPath(f *pb.FileEntry) (string, error) {
	if p, ok := b.r.ghosts[f.Id]; ok {
		return p, nil
	}
	p, err := b.makeGhost(f)
	if err != nil {
		return "", err
	}
	if b.r.ghosts == nil {
		b.r.ghosts = map[uint32]string{}
	}
	b.r.ghosts[f.Id] = p
	return p, nil
}

// removeGhosts removes the stand-ins (the tree holds what it needs).
func (r *restorer) removeGhosts() {
	for id, p := range r.ghosts {
		if drop, ok := r.ghostDrops[id]; ok {
			drop() // in the tree's own mount namespace (once)
		} else if !strings.HasPrefix(p, "/proc/") { // a memfd, through ferry's fd
			os.Remove(p)
		}
	}
	for _, m := range r.memfds {
		unix.Close(m.fd)
	}
	r.memfds = nil
}

// heldMemfd is a memfd ferry made for the tree, with the seals it gets
// once every process has it (sealMemfds).
type heldMemfd struct {
	fd    int
	seals uint32
}

// sealMemfds seals the memfds ferry made, now that the tree holds and
// maps them (a write seal forbids writable shared mappings from then on).
func (r *restorer) sealMemfds() error {
	for _, m := range r.memfds {
		if m.seals == 0 {
			continue
		}
		if _, err := unix.FcntlInt(uintptr(m.fd), unix.F_ADD_SEALS, int(m.seals)); err != nil {
			return fmt.Errorf("memfd seals %#x: %w", m.seals, err)
		}
	}
	return nil
}

type span struct{ start, end uint64 }

func findGap(occupied []span, size uint64) (uint64, error) {
	sort.Slice(occupied, func(i, j int) bool { return occupied[i].start < occupied[j].start })
	cand := uint64(1 << 32)
	for _, o := range occupied {
		if o.end <= cand {
			continue
		}
		if o.start >= cand+size {
			break
		}
		cand = (o.end + 0xfff) &^ 0xfff
	}
	if cand+size > 0x7fff_ffff_0000 {
		return 0, fmt.Errorf("no free address range of %d bytes", size)
	}
	return cand, nil
}

func (b *builder) occupied() ([]span, error) {
	var occ []span
	for _, v := range b.p.mm.Vmas {
		occ = append(occ, span{v.Start, v.End})
	}
	cur, err := proc.ReadMaps(b.pid)
	if err != nil {
		return nil, err
	}
	for _, v := range cur {
		occ = append(occ, span{v.Start, v.End})
	}
	if b.tramp != 0 {
		occ = append(occ, span{b.tramp, b.tramp + trampSize})
	}
	return occ, nil
}

// setupTrampoline maps ferry's trampoline where no dumped VMA lives and
// unmaps everything the seed left, except the kernel's special mappings.
func (b *builder) setupTrampoline() error {
	occ, err := b.occupied()
	if err != nil {
		return err
	}
	t, err := findGap(occ, trampSize)
	if err != nil {
		return err
	}
	got, err := b.sys(unix.SYS_MMAP, t, trampSize, unix.PROT_READ|unix.PROT_WRITE|unix.PROT_EXEC,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED_NOREPLACE, ^uint64(0), 0)
	if err != nil {
		return err
	}
	if got != t {
		return fmt.Errorf("trampoline mapped at %#x, want %#x", got, t)
	}
	if err := compel.WriteMem(b.pid, []compel.Segment{{Addr: t, Local: trampCode}}); err != nil {
		return err
	}
	b.tramp = t
	b.main.Gadget = t
	b.main.Stack = t + trampSize - 64
	cur, err := proc.ReadMaps(b.pid)
	if err != nil {
		return err
	}
	for _, v := range cur {
		if v.Start == t || proc.IsSpecialMapping(v.Name) {
			continue
		}
		if _, err := b.sys(unix.SYS_MUNMAP, v.Start, v.Size()); err != nil {
			return err
		}
	}
	return nil
}

// moveVdso moves [vvar], [vvar_vclock] and [vdso] to their dumped
// addresses, one mremap each, through a free region so moves never overlap.
func (b *builder) moveVdso() error {
	want := map[string]uint64{}
	for _, v := range b.p.mm.Vmas {
		switch v.Kind {
		case "vdso", "vvar", "vvar_vclock":
			want[v.Name] = v.Start
		}
	}
	cur, err := proc.ReadMaps(b.pid)
	if err != nil {
		return err
	}
	var specials []proc.Vma
	same := true
	var total uint64
	for _, v := range cur {
		if v.Name == "[vdso]" || v.Name == "[vvar]" || v.Name == "[vvar_vclock]" {
			if _, ok := want[v.Name]; !ok {
				// The process had unmapped it.
				if _, err := b.sys(unix.SYS_MUNMAP, v.Start, v.Size()); err != nil {
					return fmt.Errorf("unmap %s: %w", v.Name, err)
				}
				continue
			}
			specials = append(specials, v)
			total += v.Size()
			if want[v.Name] != v.Start {
				same = false
			}
		}
	}
	if same {
		return nil
	}
	occ, err := b.occupied()
	if err != nil {
		return err
	}
	tmp, err := findGap(occ, total)
	if err != nil {
		return err
	}
	moves := func(dst func(v proc.Vma, i int) uint64, src func(v proc.Vma, i int) uint64) error {
		for i, v := range specials {
			to := dst(v, i)
			if _, err := b.sys(unix.SYS_MREMAP, src(v, i), v.Size(), v.Size(),
				unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, to); err != nil {
				return fmt.Errorf("move %s to %#x: %w", v.Name, to, err)
			}
		}
		return nil
	}
	offs := make([]uint64, len(specials))
	var o uint64
	for i, v := range specials {
		offs[i] = o
		o += v.Size()
	}
	if err := moves(func(v proc.Vma, i int) uint64 { return tmp + offs[i] },
		func(v proc.Vma, i int) uint64 { return v.Start }); err != nil {
		return err
	}
	return moves(func(v proc.Vma, i int) uint64 { return want[v.Name] },
		func(v proc.Vma, i int) uint64 { return tmp + offs[i] })
}

// madvise advice for smaps VmFlags that must be recreated.
var vmFlagAdvice = map[string]uint64{
	"dd": unix.MADV_DONTDUMP,
	"dc": unix.MADV_DONTFORK,
	"wf": unix.MADV_WIPEONFORK,
	"hg": unix.MADV_HUGEPAGE,
	"nh": unix.MADV_NOHUGEPAGE,
	"mg": unix.MADV_MERGEABLE,
	"sr": unix.MADV_SEQUENTIAL,
	"rr": unix.MADV_RANDOM,
}

func (b *builder) restoreMemory() error {
	t0 := time.Now()
	vmas := b.p.mm.Vmas
	// Which VMAs receive pages: they are mapped writable while filling.
	hasPages := make([]bool, len(vmas))
	j := 0
	for _, e := range b.p.pagemap {
		end := e.Vaddr + uint64(e.NrPages)*pageSize
		for j < len(vmas) && vmas[j].End <= e.Vaddr {
			j++
		}
		for k := j; k < len(vmas) && vmas[k].Start < end; k++ {
			hasPages[k] = true
		}
	}
	fileFds := map[uint32]uint64{}
	defer func() {
		for _, fd := range fileFds {
			b.sys(unix.SYS_CLOSE, fd)
		}
		b.dropFerryPidfd()
	}()
	if err := b.makeShmem(); err != nil {
		return err
	}
	for i, v := range vmas {
		switch v.Kind {
		case "vdso", "vvar", "vvar_vclock", "vsyscall":
			continue
		}
		prot := uint64(v.Prot)
		if hasPages[i] && !b.lazy(v) {
			prot |= unix.PROT_READ | unix.PROT_WRITE
		}
		flags := uint64(v.Flags) | unix.MAP_FIXED
		fd := ^uint64(0)
		off := uint64(0)
		if v.Sysv {
			if ok, err := b.attachSysv(v); err != nil {
				return err
			} else if ok {
				continue
			}
		}
		if h, ok := b.r.heldShmem[v.ShmemIno]; ok && v.Kind == "shared-anon" && !v.Sysv {
			// Memory shared with other processes of the tree: the same
			// object, at the same offset.
			sfd, err := b.take(h)
			if err != nil {
				return fmt.Errorf("VMA %#x: shared memory: %w", v.Start, err)
			}
			fileFds[^uint32(0)-uint32(i)] = sfd
			fd, off, flags = sfd, v.Pgoff, unix.MAP_SHARED|unix.MAP_FIXED
		}
		if v.Kind == "file-private" || v.Kind == "file-shared" {
			f, ok := b.r.is.files[v.FileId]
			if !ok {
				return fmt.Errorf("VMA %#x: file id %d not in files.img", v.Start, v.FileId)
			}
			if h, ok := b.memfdFor(f); ok && f.Flags&unix.O_ACCMODE != unix.O_RDONLY {
				// Mapped through memfd_create's own description (see
				// restoreFiles).
				if _, ok := fileFds[v.FileId]; !ok {
					mfd, err := b.take(h)
					if err != nil {
						return fmt.Errorf("VMA %#x: memfd: %w", v.Start, err)
					}
					fileFds[v.FileId] = mfd
				}
			}
			if _, ok := fileFds[v.FileId]; !ok {
				p := f.Path
				if f.Ghost {
					var err error
					if p, err = b.ghostPath(f); err != nil {
						return err
					}
				}
				path, err := b.putString(0, p)
				if err != nil {
					return err
				}
				fd, err := b.sys(unix.SYS_OPENAT, atFdcwd, path, uint64(f.Flags|unix.O_CLOEXEC), 0)
				if err != nil {
					return fmt.Errorf("open %s: %w", f.Path, err)
				}
				fileFds[v.FileId] = fd
			}
			fd = fileFds[v.FileId]
			off = v.Pgoff
		}
		if v.Kind == "aio" {
			if err := b.makeAioRing(v); err != nil {
				return fmt.Errorf("AIO ring at %#x: %w", v.Start, err)
			}
			continue
		}
		got, err := b.sys(unix.SYS_MMAP, v.Start, v.End-v.Start, prot, flags, fd, off)
		if err != nil {
			return fmt.Errorf("map %#x-%#x (%s %s): %w", v.Start, v.End, v.Kind, v.Name, err)
		}
		if got != v.Start {
			return fmt.Errorf("map %#x-%#x landed at %#x", v.Start, v.End, got)
		}
		for _, f := range v.VmFlags {
			if adv, ok := vmFlagAdvice[f]; ok {
				if _, err := b.sys(unix.SYS_MADVISE, v.Start, v.End-v.Start, adv); err != nil {
					b.r.log.Warn("madvise failed", "vma", fmt.Sprintf("%#x", v.Start), "flag", f, "err", err)
				}
			}
		}
		if slices.Contains(v.VmFlags, "lo") {
			// Locked (mlock, MAP_LOCKED); "lf": only as pages are faulted.
			nr, arg := uint64(unix.SYS_MLOCK), uint64(0)
			if slices.Contains(v.VmFlags, "lf") {
				nr, arg = unix.SYS_MLOCK2, unix.MLOCK_ONFAULT
			}
			if _, err := b.sys(uintptr(nr), v.Start, v.End-v.Start, arg); err != nil {
				b.r.log.Warn("mlock failed", "vma", fmt.Sprintf("%#x", v.Start), "err", err)
			}
		}
		if strings.HasPrefix(v.Name, "[anon:") {
			name, err := b.putString(0, strings.TrimSuffix(strings.TrimPrefix(v.Name, "[anon:"), "]"))
			if err == nil {
				b.sys(unix.SYS_PRCTL, unix.PR_SET_VMA, unix.PR_SET_VMA_ANON_NAME, v.Start, v.End-v.Start, name)
			}
		}
	}
	if err := b.fillPages(); err != nil {
		return err
	}
	// The AIO rings' headers name their contexts by the kernel's index,
	// which the restored contexts have their own of.
	for _, r := range b.aioIDs {
		if err := compel.WriteMem(b.pid, []compel.Segment{{Addr: r.addr, Local: binary.LittleEndian.AppendUint32(nil, r.id)}}); err != nil {
			return err
		}
	}
	for i, v := range vmas {
		if hasPages[i] && !b.lazy(v) && v.Prot != v.Prot|unix.PROT_READ|unix.PROT_WRITE {
			if _, err := b.sys(unix.SYS_MPROTECT, v.Start, v.End-v.Start, uint64(v.Prot)); err != nil {
				return fmt.Errorf("mprotect %#x: %w", v.Start, err)
			}
		}
		const madvGuardInstall = 102
		for g := 0; g+1 < len(v.Guards); g += 2 {
			if _, err := b.sys(unix.SYS_MADVISE, v.Guards[g], v.Guards[g+1]-v.Guards[g], madvGuardInstall); err != nil {
				return fmt.Errorf("guard region %#x-%#x: %w", v.Guards[g], v.Guards[g+1], err)
			}
		}
	}
	b.r.stats.MemfillTimeUs += uint64(time.Since(t0).Microseconds())
	return nil
}

// attachSysv attaches the SysV shared memory segment v was (its id is
// v.ShmemIno) at v's address, if the segment is still there and v covers
// it whole; otherwise v is made as shared anonymous memory (ok false).
func (b *builder) attachSysv(v *pb.Vma) (ok bool, err error) {
	if b.r.is.inv.IpcNs {
		return true, b.shmat(v) // made whole in the tree's IPC namespace (makeIpcNs)
	}
	var ds unix.SysvShmDesc
	if _, err := unix.SysvShmCtl(int(v.ShmemIno), unix.IPC_STAT, &ds); err != nil {
		if v.SysvSeg == nil {
			b.r.log.Warn("SysV shared memory segment gone: restored as shared anonymous memory", "shmid", v.ShmemIno, "err", err)
			return false, nil
		}
		if err := b.r.makeSysv(int(v.ShmemIno), v.SysvSeg); err != nil {
			return false, fmt.Errorf("VMA %#x: %w", v.Start, err)
		}
		if _, err := unix.SysvShmCtl(int(v.ShmemIno), unix.IPC_STAT, &ds); err != nil {
			return false, fmt.Errorf("SysV shared memory %d made again: %w", v.ShmemIno, err)
		}
	}
	if size := (ds.Segsz + pageSize - 1) &^ (pageSize - 1); v.Pgoff != 0 || size != v.End-v.Start {
		b.r.log.Warn("SysV shared memory attached in part: restored as shared anonymous memory", "shmid", v.ShmemIno)
		return false, nil
	}
	return true, b.shmat(v)
}

// shmat attaches the segment of v (its id is v.ShmemIno) at v's address,
// inside the process.
func (b *builder) shmat(v *pb.Vma) error {
	flags := uint64(0)
	if v.Prot&unix.PROT_WRITE == 0 {
		flags |= unix.SHM_RDONLY
	}
	if v.Prot&unix.PROT_EXEC != 0 {
		const shmExec = 0o100000 // SHM_EXEC
		flags |= shmExec
	}
	got, err := b.sys(unix.SYS_SHMAT, v.ShmemIno, v.Start, flags)
	if err != nil {
		return fmt.Errorf("shmat %d at %#x: %w", v.ShmemIno, v.Start, err)
	}
	if got != v.Start {
		return fmt.Errorf("shmat %d landed at %#x, not %#x", v.ShmemIno, got, v.Start)
	}
	return nil
}

// makeSysv makes the SysV shared memory segment id again where it is
// gone (on another host, or removed since the dump): the same id
// (kernel.shm_next_id), key, size, owner and mode. The contents come with
// the pages of the VMAs attached to it. A segment that was removed while
// attached is removed again once the tree holds it (removeSysv); a
// restore that fails removes what it made.
func (r *restorer) makeSysv(id int, seg *pb.SysvShm) error {
	if seg.Key != 0 {
		if other, err := unix.SysvShmGet(int(seg.Key), 0, 0); err == nil {
			return fmt.Errorf("SysV shared memory %d: its key %#x is segment %d here: %w", id, uint32(seg.Key), other, ErrValidation)
		}
	}
	const nextID = "/proc/sys/kernel/shm_next_id"
	if err := os.WriteFile(nextID, []byte(strconv.Itoa(id)), 0); err != nil {
		return fmt.Errorf("SysV shared memory %d: %w", id, err)
	}
	got, err := unix.SysvShmGet(int(seg.Key), int(seg.Size), unix.IPC_CREAT|unix.IPC_EXCL|int(seg.Mode&0o777))
	if err != nil {
		os.WriteFile(nextID, []byte("-1"), 0)
		return fmt.Errorf("SysV shared memory %d: shmget: %w", id, err)
	}
	r.sysvMade = append(r.sysvMade, got)
	if got != id {
		return fmt.Errorf("SysV shared memory %d was made as %d", id, got)
	}
	var ds unix.SysvShmDesc
	if _, err := unix.SysvShmCtl(id, unix.IPC_STAT, &ds); err != nil {
		return fmt.Errorf("SysV shared memory %d: %w", id, err)
	}
	ds.Perm.Uid, ds.Perm.Gid, ds.Perm.Mode = seg.Uid, seg.Gid, seg.Mode&0o777
	if _, err := unix.SysvShmCtl(id, unix.IPC_SET, &ds); err != nil {
		return fmt.Errorf("SysV shared memory %d: owner and mode: %w", id, err)
	}
	if seg.Removed {
		r.sysvRemoved = append(r.sysvRemoved, id)
	}
	r.log.Info("SysV shared memory segment made again", "shmid", id, "key", seg.Key, "size", seg.Size)
	return nil
}

// removeSysv removes the segments that had been removed at the dump (the
// tree holds them now), or, when the restore failed, every one it made.
func (r *restorer) removeSysv(failed bool) {
	ids := r.sysvRemoved
	if failed {
		ids = r.sysvMade
	}
	for _, id := range ids {
		if _, err := unix.SysvShmCtl(id, unix.IPC_RMID, nil); err != nil {
			r.log.Warn("removing SysV shared memory", "shmid", id, "err", err)
		}
	}
}

type aioID struct {
	addr uint64
	id   uint32
}

// makeAioRing makes the AIO context whose ring v was. io_setup for a ring
// of as many events as it held, the ring moved to its address (the context's
// id for io_getevents is the ring's address), then brought to the
// dumped head and tail: the kernel keeps its own tail, so zero-byte
// writes to /dev/null complete there, as many as it takes, and are reaped
// up to the head. The ring's pages are filled like the others' after
// (the events between head and tail), its id put back.
func (b *builder) makeAioRing(v *pb.Vma) error {
	nr, head, tail := v.AioNr, v.AioHead, v.AioTail
	if nr == 0 || head >= nr || tail >= nr {
		return fmt.Errorf("ring of %d events, head %d, tail %d: %w", nr, head, tail, ErrValidation)
	}
	ctxp := b.scratch() + scratchSize - 64
	if _, err := b.put(scratchSize-64, make([]byte, 8)); err != nil {
		return err
	}
	// The kernel makes a ring for 2*max(asked, 4*CPUs)+2 events, rounded
	// up to whole pages (a 32-byte header, 32 bytes an event).
	ask := uint64(nr-2) / 2
	if _, err := b.sys(unix.SYS_IO_SETUP, ask, ctxp); err != nil {
		return fmt.Errorf("io_setup(%d): %w", ask, err)
	}
	buf := make([]byte, 8)
	if err := readMem(b.pid, ctxp, buf); err != nil {
		return err
	}
	at := binary.LittleEndian.Uint64(buf)
	if at != v.Start {
		got, err := b.sys(unix.SYS_MREMAP, at, v.End-v.Start, v.End-v.Start, unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, v.Start)
		if err != nil {
			return fmt.Errorf("move it from %#x: %w", at, err)
		}
		if got != v.Start {
			return fmt.Errorf("moved to %#x", got)
		}
	}
	hdr := make([]byte, 16)
	if err := readMem(b.pid, v.Start, hdr); err != nil {
		return err
	}
	if got := binary.LittleEndian.Uint32(hdr[4:]); got != nr {
		return fmt.Errorf("io_setup made a ring of %d events, not %d", got, nr)
	}
	b.aioIDs = append(b.aioIDs, aioID{addr: v.Start, id: binary.LittleEndian.Uint32(hdr)})
	if head == 0 && tail == 0 {
		return nil
	}
	// Completions to bring the kernel's tail (and, reaped, the head)
	// where they were: head of them reaped, then the rest left.
	path, err := b.putString(0, "/dev/null")
	if err != nil {
		return err
	}
	null, err := b.sys(unix.SYS_OPENAT, atFdcwd, path, unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer b.sys(unix.SYS_CLOSE, null)
	// struct iocb (64 bytes): aio_fildes at 20, aio_lio_opcode at 16
	// (IOCB_CMD_PWRITE 1), aio_buf at 24, aio_nbytes at 32 (0).
	iocb := make([]byte, 64)
	binary.LittleEndian.PutUint16(iocb[16:], 1)
	binary.LittleEndian.PutUint32(iocb[20:], uint32(null))
	iocbAddr, err := b.put(64, iocb)
	if err != nil {
		return err
	}
	submit := func(n uint32) error {
		for n > 0 {
			k := min(n, 1024)
			ptrs := make([]byte, 8*k)
			for i := range k {
				binary.LittleEndian.PutUint64(ptrs[8*i:], iocbAddr)
			}
			pa, err := b.put(256, ptrs)
			if err != nil {
				return err
			}
			got, err := b.sys(unix.SYS_IO_SUBMIT, v.Start, uint64(k), pa)
			if err != nil || uint32(got) != k {
				return fmt.Errorf("io_submit %d: %d, %v", k, got, err)
			}
			n -= k
		}
		return nil
	}
	reap := func(n uint32) error {
		for n > 0 {
			k := min(n, 1024)
			ev := b.scratch() + 256 + 8*1024
			got, err := b.sys(unix.SYS_IO_GETEVENTS, v.Start, uint64(k), uint64(k), ev, 0)
			if err != nil || uint32(got) != k {
				return fmt.Errorf("io_getevents %d: %d, %v", k, got, err)
			}
			n -= k
		}
		return nil
	}
	// Up to the head, in batches the ring can hold.
	for left := head; left > 0; {
		k := min(left, nr-1)
		if err := submit(k); err != nil {
			return err
		}
		if err := reap(k); err != nil {
			return err
		}
		left -= k
	}
	return submit((tail + nr - head) % nr)
}

func (b *builder) restoreMm() error {
	mm := b.p.mm
	exe, ok := b.r.is.files[mm.ExeFileId]
	if !ok {
		return fmt.Errorf("executable (file id %d) not in files.img", mm.ExeFileId)
	}
	path, err := b.putString(0, exe.Path)
	if err != nil {
		return err
	}
	exeFd, err := b.sys(unix.SYS_OPENAT, atFdcwd, path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open executable %s: %w", exe.Path, err)
	}
	defer b.sys(unix.SYS_CLOSE, exeFd)
	auxv := make([]byte, 8*len(mm.Auxv))
	for i, v := range mm.Auxv {
		binary.LittleEndian.PutUint64(auxv[8*i:], v)
	}
	auxvAddr, err := b.put(4096, auxv)
	if err != nil {
		return err
	}
	// struct prctl_mm_map (include/uapi/linux/prctl.h).
	m := make([]byte, 104)
	le := binary.LittleEndian
	for i, v := range []uint64{mm.StartCode, mm.EndCode, mm.StartData, mm.EndData, mm.StartBrk, mm.Brk,
		mm.StartStack, mm.ArgStart, mm.ArgEnd, mm.EnvStart, mm.EnvEnd, auxvAddr} {
		le.PutUint64(m[8*i:], v)
	}
	le.PutUint32(m[96:], uint32(len(auxv)))
	le.PutUint32(m[100:], uint32(exeFd))
	mAddr, err := b.put(1024, m)
	if err != nil {
		return err
	}
	if _, err := b.sys(unix.SYS_PRCTL, unix.PR_SET_MM, unix.PR_SET_MM_MAP, mAddr, uint64(len(m)), 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_MM_MAP): %w", err)
	}
	return nil
}

func (b *builder) restoreRlimits() error {
	for _, l := range b.p.core.Rlimits {
		buf := make([]byte, 16)
		binary.LittleEndian.PutUint64(buf, l.Cur)
		binary.LittleEndian.PutUint64(buf[8:], l.Max)
		a, err := b.put(0, buf)
		if err != nil {
			return err
		}
		if _, err := b.sys(unix.SYS_PRLIMIT64, 0, uint64(l.Resource), a, 0); err != nil {
			// Raising a hard limit needs CAP_SYS_RESOURCE; keep ours then.
			b.r.log.Warn("cannot restore rlimit", "resource", l.Resource, "cur", l.Cur, "max", l.Max, "err", err)
		}
	}
	return nil
}

// restoreCwd enters the working directory before the files are made (a
// unix socket bound to a relative name is bound again relative to it); a
// process with a root of its own enters it after its chroot instead
// (restoreTask), since files are opened by paths from ferry's root.
func (b *builder) restoreCwd() error {
	if !b.cwdEntered() {
		return nil
	}
	return b.chdir()
}

// cwdEntered tells whether restoreCwd enters the working directory before
// the files are made (the process has no root of its own).
func (b *builder) cwdEntered() bool {
	root, ok := b.r.is.files[b.p.core.RootId]
	return !ok || root.Path == "/"
}

// chdir enters the dumped working directory: a removed one is stood in
// for by a directory made, entered, and removed again.
func (b *builder) chdir() error {
	cwd, ok := b.r.is.files[b.p.core.CwdId]
	if !ok {
		return nil
	}
	path := cwd.Path
	if pid, ok := strings.CutPrefix(cwd.Path, "/proc/"); ok && cwd.DirDeleted && isNumber(pid) {
		// The /proc directory of a process gone: that of a stand-in
		// that is gone once the restore ends.
		dead, err := b.r.deadProcess(cwd.Ino)
		if err != nil {
			return err
		}
		path = fmt.Sprintf("/proc/%d", dead)
	} else if cwd.DirDeleted {
		fs := b.fsFor(cwd.Path)
		p, made, err := standIn(fs, cwd)
		defer func() {
			for _, d := range made { // innermost first
				fs.dropper(d)()
			}
		}()
		if err != nil {
			return err
		}
		path = p
	}
	a, err := b.putString(0, path)
	if err != nil {
		return err
	}
	if _, err := b.sys(unix.SYS_CHDIR, a); err != nil {
		return fmt.Errorf("chdir %s: %w", cwd.Path, err)
	}
	return nil
}

// isNumber tells whether s is a decimal number.
func isNumber(s string) bool {
	_, err := strconv.ParseUint(s, 10, 32)
	return err == nil
}

func (b *builder) restoreTask() error {
	c := b.p.core
	if _, err := b.sys(unix.SYS_UMASK, uint64(c.Umask)); err != nil {
		return err
	}
	if root, ok := b.r.is.files[c.RootId]; ok && root.Path != "/" {
		a, err := b.putString(0, root.Path)
		if err != nil {
			return err
		}
		if _, err := b.sys(unix.SYS_CHROOT, a); err != nil {
			return fmt.Errorf("chroot %s: %w", root.Path, err)
		}
		// The working directory, as seen from the new root.
		if err := b.chdir(); err != nil {
			return err
		}
	}
	if _, err := b.sys(unix.SYS_PERSONALITY, uint64(c.Personality)); err != nil {
		return err
	}
	// The session and group were made with the tree (createTree); a
	// session leader takes its terminal now that its files are open.
	if pt := b.p.pstree; pt.Sid == pt.Pid {
		if err := b.takeCtty(); err != nil {
			return err
		}
	}
	if c.Dumpable != 1 {
		b.sys(unix.SYS_PRCTL, unix.PR_SET_DUMPABLE, uint64(c.Dumpable))
	}
	// The root's parent is not the one it had (ferry, which exits): its
	// parent-death signal would fire for nothing.
	if c.PdeathSignal != 0 && b.p != b.r.is.procs[0] {
		if _, err := b.sys(unix.SYS_PRCTL, unix.PR_SET_PDEATHSIG, uint64(c.PdeathSignal)); err != nil {
			return fmt.Errorf("parent-death signal %d: %w", c.PdeathSignal, err)
		}
	}
	if c.ThpDisabled {
		b.sys(unix.SYS_PRCTL, unix.PR_SET_THP_DISABLE, 1, 0, 0, 0)
	}
	if c.ChildSubreaper != 0 {
		b.sys(unix.SYS_PRCTL, unix.PR_SET_CHILD_SUBREAPER, 1)
	}
	// membarrier registrations: each MEMBARRIER_CMD_REGISTER_* command
	// (global expedited, private expedited, its sync-core and rseq forms)
	// made again.
	for _, cmd := range []uint64{4, 16, 64, 256} {
		if uint64(c.Membarrier)&cmd != 0 {
			if _, err := b.sys(unix.SYS_MEMBARRIER, cmd, 0, 0); err != nil {
				return fmt.Errorf("membarrier registration %d: %w", cmd, err)
			}
		}
	}
	// Written from ferry's side, like /proc/PID/oom_score_adj itself. Lowering
	// it needs CAP_SYS_RESOURCE, which root lacks on some hosts: say so.
	if c.OomScoreAdj != 0 {
		if err := os.WriteFile(fmt.Sprintf("/proc/%d/oom_score_adj", b.pid), []byte(strconv.Itoa(int(c.OomScoreAdj))), 0); err != nil {
			b.r.log.Warn("cannot restore oom_score_adj", "value", c.OomScoreAdj, "err", err)
		}
	}
	// A caller's processes have its loginuid (seedAsCaller).
	if b.r.opts.Caller == nil {
		if err := b.restoreLoginuid(c.Loginuid); err != nil {
			b.r.log.Warn("cannot restore loginuid", "value", c.Loginuid, "err", err)
		}
	}
	if c.TimerslackNs != 0 {
		b.sys(unix.SYS_PRCTL, unix.PR_SET_TIMERSLACK, c.TimerslackNs)
	}
	return nil
}

func (b *builder) restoreSigactions() error {
	// The seed inherited ferry's ignored signals (SIG_IGN survives exec);
	// the image lists only non-default dispositions, so reset the rest.
	st, err := proc.ReadStatus(b.pid)
	if err != nil {
		return err
	}
	inImage := uint64(0)
	for _, sa := range b.p.core.Sigactions {
		inImage |= 1 << (sa.Sig - 1)
	}
	dfl := make([]byte, 32)
	for sig := 1; sig <= 64; sig++ {
		bit := uint64(1) << (sig - 1)
		if st.SigIgn&bit == 0 || inImage&bit != 0 {
			continue
		}
		a, err := b.put(0, dfl)
		if err != nil {
			return err
		}
		if _, err := b.sys(unix.SYS_RT_SIGACTION, uint64(sig), a, 0, 8); err != nil {
			return fmt.Errorf("reset signal %d: %w", sig, err)
		}
	}
	for _, sa := range b.p.core.Sigactions {
		if sa.Sig == uint32(unix.SIGTRAP) && sa.Handler == 1 {
			// SIG_IGN: set last (finish), the remote calls' int3 would
			// reset it to the default.
			b.trapIgnored = sa
			continue
		}
		if err := b.setSigaction(b.main, sa); err != nil {
			return err
		}
	}
	return nil
}

// setSigaction sets sa (struct kernel_sigaction) through a remote
// rt_sigaction in t.
func (b *builder) setSigaction(t *compel.Task, sa *pb.SigAction) error {
	buf := make([]byte, 32)
	le := binary.LittleEndian
	le.PutUint64(buf[0:], sa.Handler)
	le.PutUint64(buf[8:], sa.Flags)
	le.PutUint64(buf[16:], sa.Restorer)
	le.PutUint64(buf[24:], sa.Mask)
	a, err := b.put(0, buf)
	if err != nil {
		return err
	}
	if _, err := t.Syscall(unix.SYS_RT_SIGACTION, uint64(sa.Sig), a, 0, 8); err != nil {
		return fmt.Errorf("signal %d: %w", sa.Sig, err)
	}
	return nil
}

// PR_TIMER_CREATE_RESTORE_IDS (include/uapi/linux/prctl.h, Linux 6.17):
// while on, timer_create takes the id to create from *created_timer_id.
const (
	prTimerCreateRestoreIDs = 77
	prTimerRestoreIDsOff    = 0
	prTimerRestoreIDsOn     = 1
)

func (b *builder) restoreTimers() error {
	le := binary.LittleEndian
	for _, it := range b.p.core.Itimers {
		buf := make([]byte, 32)
		le.PutUint64(buf[0:], uint64(it.IntervalUs/1e6))
		le.PutUint64(buf[8:], uint64(it.IntervalUs%1e6))
		le.PutUint64(buf[16:], uint64(it.ValueUs/1e6))
		le.PutUint64(buf[24:], uint64(it.ValueUs%1e6))
		a, err := b.put(0, buf)
		if err != nil {
			return err
		}
		if _, err := b.sys(unix.SYS_SETITIMER, uint64(it.Which), a, 0); err != nil {
			return fmt.Errorf("itimer %d: %w", it.Which, err)
		}
	}
	if len(b.p.core.PosixTimers) == 0 {
		return nil
	}
	byID := append([]*pb.PosixTimer(nil), b.p.core.PosixTimers...)
	sort.Slice(byID, func(i, j int) bool { return byID[i].Id < byID[j].Id })
	_, idErr := b.sys(unix.SYS_PRCTL, prTimerCreateRestoreIDs, prTimerRestoreIDsOn)
	for _, t := range byID {
		// struct sigevent: sigev_value, sigev_signo, sigev_notify, _tid.
		sev := make([]byte, 64)
		le.PutUint64(sev[0:], t.SigevValue)
		le.PutUint32(sev[8:], uint32(t.Signo))
		le.PutUint32(sev[12:], uint32(t.Notify))
		le.PutUint32(sev[16:], uint32(t.NotifyTid))
		sevAddr, err := b.put(0, sev)
		if err != nil {
			return err
		}
		idBuf := make([]byte, 4)
		le.PutUint32(idBuf, uint32(t.Id))
		idAddr, err := b.put(128, idBuf)
		if err != nil {
			return err
		}
		if _, err := b.sys(unix.SYS_TIMER_CREATE, uint64(t.ClockId), sevAddr, idAddr); err != nil {
			return fmt.Errorf("POSIX timer %d: %w", t.Id, err)
		}
		got := make([]byte, 4)
		if err := compel.ReadMem(b.pid, []compel.Segment{{Addr: idAddr, Local: got}}); err != nil {
			return err
		}
		if int32(le.Uint32(got)) != t.Id {
			if idErr != nil {
				return fmt.Errorf("POSIX timer %d was created as %d and this kernel cannot choose timer ids (prctl PR_TIMER_CREATE_RESTORE_IDS: %v)", t.Id, int32(le.Uint32(got)), idErr)
			}
			return fmt.Errorf("POSIX timer %d was created as %d", t.Id, int32(le.Uint32(got)))
		}
	}
	if idErr == nil {
		b.sys(unix.SYS_PRCTL, prTimerCreateRestoreIDs, prTimerRestoreIDsOff)
	}
	for _, t := range byID {
		if t.ValueNs == 0 {
			continue
		}
		its := make([]byte, 32)
		le.PutUint64(its[0:], uint64(t.IntervalNs/1e9))
		le.PutUint64(its[8:], uint64(t.IntervalNs%1e9))
		le.PutUint64(its[16:], uint64(t.ValueNs/1e9))
		le.PutUint64(its[24:], uint64(t.ValueNs%1e9))
		a, err := b.put(0, its)
		if err != nil {
			return err
		}
		if _, err := b.sys(unix.SYS_TIMER_SETTIME, uint64(t.Id), 0, a, 0); err != nil {
			return fmt.Errorf("POSIX timer %d: %w", t.Id, err)
		}
	}
	return nil
}

// restoreLoginuid writes the dumped loginuid, from inside the process:
// only a task itself may write its /proc/self/loginuid.
func (b *builder) restoreLoginuid(v uint32) error {
	cur, err := os.ReadFile(fmt.Sprintf("/proc/%d/loginuid", b.pid))
	want := strconv.FormatUint(uint64(v), 10)
	if err != nil || strings.TrimSpace(string(cur)) == want {
		return nil
	}
	path, err := b.putString(0, "/proc/self/loginuid")
	if err != nil {
		return err
	}
	fd, err := b.sys(unix.SYS_OPENAT, atFdcwd, path, unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer b.sys(unix.SYS_CLOSE, fd)
	val, err := b.put(256, []byte(want))
	if err != nil {
		return err
	}
	_, err = b.sys(unix.SYS_WRITE, fd, val, uint64(len(want)))
	return err
}
