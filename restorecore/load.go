package restorecore

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
)

// imageSet is a loaded, validated image directory.
type imageSet struct {
	dir    string
	inv    *pb.Inventory
	procs  []*procImage
	files  map[uint32]*pb.FileEntry
	ghosts map[uint32]*pb.GhostFile
	chain  images.PageChain
	// noFileChecks: the files are not checked before the restore (a
	// caller's, which its processes open with its rights).
	noFileChecks bool
	// joinsPidNs: the restore joins an existing PID namespace
	// (--join-ns pid), where the PIDs are checked by clone3 itself.
	joinsPidNs bool
}

// close unmaps the page files.
func (is *imageSet) close() { is.chain.Close() }

type procImage struct {
	// remotePages: the page data is not in the images directory (lazy
	// restore from a page server); ranges lists the pages instead.
	remotePages bool
	ranges      [][2]uint64
	// runs is the page data of the process, resolved through the parent
	// image chain at load time (mapped until imageSet.close).
	runs    []images.PageRun
	pstree  *pb.PstreeEntry
	core    *pb.TaskCore
	mm      *pb.MmCore
	fds     *pb.FdTable
	pagemap []images.PageEntry
	pagesID uint32
	// zombie: a dead child not reaped at dump time; only its pstree entry
	// and core (exit code) are in the images.
	zombie bool
}

// checkPstree checks that every process but the root comes after its
// parent, and that no PID appears twice.
func checkPstree(dir string, procs []*procImage) error {
	seen := map[int32]bool{}
	name := filepath.Join(dir, images.PstreeName)
	for i, p := range procs {
		pt := p.pstree
		if seen[pt.Pid] {
			return fmt.Errorf("%s: process %d listed twice: %w", name, pt.Pid, images.ErrCorrupt)
		}
		if i > 0 && !seen[pt.Ppid] {
			return fmt.Errorf("%s: process %d comes before its parent %d: %w", name, pt.Pid, pt.Ppid, images.ErrCorrupt)
		}
		seen[pt.Pid] = true
	}
	return nil
}

func load(dir string, lazy bool, chains *images.ChainCache) (_ *imageSet, err error) {
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("images directory: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("images directory %s: not a directory", dir)
	}
	is := &imageSet{dir: dir, inv: &pb.Inventory{}, files: map[uint32]*pb.FileEntry{}, ghosts: map[uint32]*pb.GhostFile{}}
	is.chain.Cache = chains
	defer func() {
		if err != nil {
			is.close()
		}
	}()
	if err := images.ReadOne(dir, "inventory.img", images.KindInventory, is.inv); err != nil {
		return nil, err
	}
	r, err := images.Open(dir, "pstree.img", images.KindPstree)
	if err != nil {
		return nil, err
	}
	for {
		e := &pb.PstreeEntry{}
		if err := r.Next(e); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			r.Close()
			return nil, err
		}
		is.procs = append(is.procs, &procImage{pstree: e})
	}
	r.Close()
	if len(is.procs) == 0 {
		return nil, fmt.Errorf("%s: no process in the image", filepath.Join(dir, "pstree.img"))
	}
	if err := checkPstree(dir, is.procs); err != nil {
		return nil, err
	}
	for _, p := range is.procs {
		pid := p.pstree.Pid
		p.core = &pb.TaskCore{}
		if err := images.ReadOne(dir, images.CoreName(pid), images.KindCore, p.core); err != nil {
			return nil, err
		}
		if p.core.State == "zombie" {
			if p == is.procs[0] {
				return nil, fmt.Errorf("%s: the root process is a zombie: %w", filepath.Join(dir, images.CoreName(pid)), images.ErrCorrupt)
			}
			p.zombie = true
			continue
		}
		p.mm = &pb.MmCore{}
		if err := images.ReadOne(dir, fmt.Sprintf("mm-%d.img", pid), images.KindMm, p.mm); err != nil {
			return nil, err
		}
		if err := checkVmas(dir, pid, p.mm.Vmas); err != nil {
			return nil, err
		}
		p.fds = &pb.FdTable{}
		if err := images.ReadOne(dir, fmt.Sprintf("fdinfo-%d.img", pid), images.KindFdinfo, p.fds); err != nil {
			return nil, err
		}
		head, err := loadPagemap(dir, p)
		if err != nil {
			return nil, err
		}
		var keep func(images.PageEntry) bool
		if lazy {
			// The daemon serves the lazy memory: only the rest needs
			// page data here.
			keep = eagerFilter(p.mm.Vmas)
		}
		runs, err := is.chain.ResolveEntries(dir, pid, head, p.pagemap, keep)
		if err != nil && lazy && (errors.Is(err, os.ErrNotExist) || noPageData(dir, p.pagesID)) {
			// No page data here (none, or the empty file of a dump that
			// served its pages): a lazy restore gets it from the daemon's
			// page server.
			// The daemon fills the pages outside the lazy memory before
			// the tree runs (fillPages): only those ranges are wanted.
			eager := slices.DeleteFunc(slices.Clone(p.pagemap), func(e images.PageEntry) bool { return !keep(e) })
			if p.ranges, err = is.chain.Pages(dir, pid, eager); err != nil {
				return nil, err
			}
			p.remotePages = true
		} else if err != nil {
			return nil, err
		}
		p.runs = runs
		if len(p.core.Threads) == 0 || p.core.Threads[0].Tid != pid {
			return nil, fmt.Errorf("%s: main thread %d missing: %w", filepath.Join(dir, fmt.Sprintf("core-%d.img", pid)), pid, images.ErrCorrupt)
		}
	}
	err = readFiles(dir, func(e *pb.FileEntry) error {
		is.files[e.Id] = e
		if e.Ghost {
			g := &pb.GhostFile{}
			if err := images.ReadOne(dir, fmt.Sprintf("ghost-%d.img", e.Id), images.KindGhost, g); err != nil {
				return err
			}
			is.ghosts[e.Id] = g
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return is, nil
}

// readFiles calls fn with each entry of dir's files.img, in order.
func readFiles(dir string, fn func(*pb.FileEntry) error) error {
	fr, err := images.Open(dir, "files.img", images.KindFiles)
	if err != nil {
		return err
	}
	defer fr.Close()
	for {
		e := &pb.FileEntry{}
		if err := fr.Next(e); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return err
		}
		if err := fn(e); err != nil {
			return err
		}
	}
}

// noPageData tells whether the pages file id in dir holds no data (a
// dump --lazy-pages writes it so).
func noPageData(dir string, id uint32) bool {
	r, err := images.OpenPages(dir, images.PagesName(id))
	if err != nil {
		return false
	}
	defer r.Close()
	return r.Size() == 0
}

// checkVmas checks that a process's VMAs are page aligned, not empty, and
// in address order without overlap, as everything that walks them assumes.
func checkVmas(dir string, pid int32, vmas []*pb.Vma) error {
	var prevEnd uint64
	for i, v := range vmas {
		if v.Start%pageSize != 0 || v.End%pageSize != 0 || v.End <= v.Start || v.Start < prevEnd {
			return fmt.Errorf("%s: VMA %d (%#x-%#x) is empty, unaligned or out of order: %w",
				filepath.Join(dir, images.MmName(pid)), i, v.Start, v.End, images.ErrCorrupt)
		}
		prevEnd = v.End
	}
	return nil
}

func loadPagemap(dir string, p *procImage) (*pb.PagemapHead, error) {
	head, entries, err := images.ReadPagemap(dir, p.pstree.Pid)
	if err != nil {
		return nil, err
	}
	if head.Compression != "" && head.Compression != images.Zstd {
		return nil, fmt.Errorf("%s: page compression %q is not supported by this ferry: %w",
			filepath.Join(dir, images.PagemapName(p.pstree.Pid)), head.Compression, images.ErrVersion)
	}
	p.pagesID = head.PagesId
	p.pagemap = entries
	return head, nil
}

const pageSize = 4096

func refuse(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrValidation, fmt.Sprintf(format, a...))
}

// validate checks everything that can be checked before touching anything.
// zombieGrace is how long a restore waits for a zombie holding a PID it
// needs to be reaped: the process a dump just killed is one until its
// parent (often a slow init) collects it.
const zombieGrace = 3 * time.Second

// tidInUse reports whether tid exists; a zombie is waited for (up to
// zombieGrace) before it counts.
func tidInUse(tid int) (busy, zombie bool) {
	deadline := time.Now().Add(zombieGrace)
	for {
		st, err := proc.ReadStat(tid)
		if err != nil {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", tid)); err != nil {
				return false, false
			}
			return true, false
		}
		if st.State != 'Z' && st.State != 'X' {
			return true, false
		}
		if time.Now().After(deadline) {
			return true, true
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (is *imageSet) validate(localXstate []byte) error {
	inv := is.inv
	if inv.PageSize != 0 && inv.PageSize != pageSize {
		return refuse("image page size %d differs from this machine's %d", inv.PageSize, pageSize)
	}
	// PIDs and TIDs free (in a PID namespace of the tree's own, made
	// new, they are; in one it joins, clone3 says).
	for _, p := range is.procs {
		if inv.PidNs || is.joinsPidNs {
			break
		}
		if p.zombie {
			if busy, _ := tidInUse(int(p.pstree.Pid)); busy {
				return refuse("PID %d (a zombie in the image) is in use", p.pstree.Pid)
			}
			continue
		}
		for _, t := range p.core.Threads {
			if busy, zombie := tidInUse(int(t.Tid)); busy {
				what := "TID"
				if t.Tid == p.pstree.Pid {
					what = "PID"
				}
				if zombie {
					return refuse("%s %d is in use (by a zombie its parent has not reaped)", what, t.Tid)
				}
				return refuse("%s %d is in use", what, t.Tid)
			}
		}
	}
	for _, p := range is.procs {
		if err := validSeccomp(p); err != nil {
			return refuse("process %d: %v", p.pstree.Pid, err)
		}
	}
	// A process enters a user namespace (enterUserNs) alone: with one
	// thread, sharing no fs_struct; its threads are made after, with
	// their TIDs, which needs the PID namespace to belong to the user
	// namespace.
	if inv.UserNs != nil {
		for _, p := range is.procs {
			if p.zombie {
				continue
			}
			if p.core.FsSharedWith != 0 {
				return refuse("process %d shares its root and working directory with process %d (CLONE_FS) in a user namespace of the tree's own: not supported yet", p.pstree.Pid, p.core.FsSharedWith)
			}
			if len(p.core.Threads) > 1 && !inv.PidNs {
				return refuse("process %d has %d threads in a user namespace of the tree's own but no PID namespace of its own: not supported yet", p.pstree.Pid, len(p.core.Threads))
			}
		}
	}
	// Files present and unchanged (but those in /proc of the tree's own
	// processes, which exist once the tree does).
	ours := map[string]bool{}
	for _, p := range is.procs {
		ours[fmt.Sprintf("/proc/%d/", p.pstree.Pid)] = true
	}
	for _, f := range is.files {
		if images.OnOwnMount(inv.MntNs, f.Path) {
			// On a mount of the tree's own, made by the restore (and the
			// stand-ins of what was deleted there made in it too).
			continue
		}
		if rest, ok := strings.CutPrefix(f.Path, "/proc/"); ok {
			if i := strings.IndexByte(rest, '/'); i > 0 && ours["/proc/"+rest[:i+1]] {
				continue
			}
		}
		if is.noFileChecks {
			continue
		}
		if err := validateFile(f); err != nil {
			return err
		}
	}
	// vDSO layout and contents.
	if err := validateVdso(inv); err != nil {
		return err
	}
	// CPU: every xstate component the image uses must exist here, with the
	// same buffer size.
	if len(localXstate) > 0 && inv.XstateSize != 0 {
		lf, _ := xstateFeatures(localXstate)
		if inv.Xfeatures&^lf != 0 {
			return refuse("the image uses CPU state components %#x this CPU lacks (image %#x, here %#x)", inv.Xfeatures&^lf, inv.Xfeatures, lf)
		}
		if int(inv.XstateSize) != len(localXstate) {
			return refuse("xstate size %d in the image, %d on this CPU", inv.XstateSize, len(localXstate))
		}
	}
	return nil
}

func validateFile(f *pb.FileEntry) error {
	if f.ShellJobTty || f.Ghost {
		return nil
	}
	switch f.Type {
	case "pipe", "eventfd", "epoll", "inet", "unix", "ptmx", "pts", "signalfd", "timerfd", "inotify", "fanotify", "userfaultfd", "pidfd", "nsfile", "devtty":
		return nil
	case "dir":
		if f.DirDeleted {
			return nil // made again, its removed parents with it (standIn)
		}
	case "fifo":
		if f.FifoDeleted {
			return nil
		}
		if st, err := os.Stat(f.Path); err != nil || st.Mode()&os.ModeNamedPipe == 0 {
			return refuse("FIFO %s is missing or not a FIFO", f.Path)
		}
		return nil
	}
	if f.SymlinkDeleted {
		return nil // made again (restoreFiles)
	}
	var st unix.Stat_t
	stat := unix.Stat
	if f.Type == "symlink" {
		stat = unix.Lstat
	}
	if err := stat(f.Path, &st); err != nil {
		return refuse("file %s: %v", f.Path, err)
	}
	switch f.Type {
	case "symlink":
		if st.Mode&unix.S_IFMT != unix.S_IFLNK {
			return refuse("%s is no longer a symbolic link", f.Path)
		}
	case "reg":
		if st.Mode&unix.S_IFMT != unix.S_IFREG {
			return refuse("file %s is no longer a regular file", f.Path)
		}
		if st.Size != f.Size {
			return refuse("file %s changed since the dump: size %d, was %d", f.Path, st.Size, f.Size)
		}
	case "dir":
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return refuse("%s is no longer a directory", f.Path)
		}
	case "chr":
		if st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != f.Rdev {
			return refuse("device %s changed since the dump", f.Path)
		}
	}
	return nil
}

func validateVdso(inv *pb.Inventory) error {
	here, h, err := localVdso()
	if err != nil {
		return err
	}
	if len(inv.VdsoLayout) != len(here) {
		return refuse("vDSO layout differs from the dumping kernel (%s here, %s in the image)", layoutString(here), layoutString(inv.VdsoLayout))
	}
	for i := range here {
		if here[i].Name != inv.VdsoLayout[i].Name || here[i].Size != inv.VdsoLayout[i].Size {
			return refuse("vDSO layout differs from the dumping kernel (%s here, %s in the image)", layoutString(here), layoutString(inv.VdsoLayout))
		}
	}
	if len(inv.VdsoSha256) > 0 && !bytes.Equal(h[:], inv.VdsoSha256) {
		return refuse("the vDSO of this kernel (%s) differs from the dumping kernel's (%s)", kernelRelease(), inv.KernelRelease)
	}
	return nil
}

// localVdso returns the layout of this kernel's [vvar]/[vdso] areas and
// the SHA-256 of its vDSO code.
func localVdso() ([]*pb.SpecialVma, [32]byte, error) {
	vmas, err := proc.ReadMaps(os.Getpid())
	if err != nil {
		return nil, [32]byte{}, err
	}
	var here []*pb.SpecialVma
	var text []byte
	for _, v := range vmas {
		switch v.Name {
		case "[vvar]", "[vvar_vclock]", "[vdso]":
			here = append(here, &pb.SpecialVma{Name: v.Name, Size: v.Size()})
		}
		if v.Name == "[vdso]" {
			text = make([]byte, v.Size())
			if err := readSelf(v.Start, text); err != nil {
				return nil, [32]byte{}, err
			}
		}
	}
	return here, sha256.Sum256(text), nil
}

// VdsoFingerprint names this kernel's vDSO (its areas' sizes and a hash
// of its code): a process dumped where it differs cannot be restored
// here. Migrations compare it before touching anything.
func VdsoFingerprint() (string, error) {
	here, h, err := localVdso()
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s sha256:%x", layoutString(here), h[:8]), nil
}

func layoutString(l []*pb.SpecialVma) string {
	var b bytes.Buffer
	for i, v := range l {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s:%d", v.Name, v.Size)
	}
	return b.String()
}

func kernelRelease() string {
	var uts unix.Utsname
	unix.Uname(&uts)
	return unix.ByteSliceToString(uts.Release[:])
}

// xstateFeatures reads XCR0 and the xstate size from the software-reserved
// bytes of an NT_X86_XSTATE buffer (struct _fpx_sw_bytes, offset 464).
func xstateFeatures(xs []byte) (uint64, uint32) {
	if len(xs) < 488 {
		return 0, 0
	}
	return leU64(xs[472:]), leU32(xs[468:])
}

// localXstate reads an xstate buffer of a traced task to learn this CPU's
// layout. Preconditions: tid is stopped and traced by this thread.
func localXstate(tid int) ([]byte, error) { return ptrace.GetXstate(tid) }

// validSeccomp checks the seccomp state of p's threads against its
// filters.
func validSeccomp(p *procImage) error {
	if p.zombie || p.core == nil {
		return nil
	}
	for i, f := range p.core.SeccompFilters {
		if n := len(f.Prog); n == 0 || n%8 != 0 || n/8 > 4096 {
			return fmt.Errorf("seccomp filter %d: %d bytes, not a program of 1 to 4096 instructions", i, n)
		}
	}
	for _, t := range p.core.Threads {
		switch {
		case t.SeccompMode < 0 || t.SeccompMode > 2:
			return fmt.Errorf("thread %d: seccomp mode %d", t.Tid, t.SeccompMode)
		case t.SeccompMode == 2 && len(t.SeccompChain) == 0:
			return fmt.Errorf("thread %d: seccomp filter mode without filters", t.Tid)
		case t.SeccompMode != 2 && len(t.SeccompChain) > 0:
			return fmt.Errorf("thread %d: seccomp filters in mode %d", t.Tid, t.SeccompMode)
		}
		for _, i := range t.SeccompChain {
			if int(i) >= len(p.core.SeccompFilters) {
				return fmt.Errorf("thread %d: seccomp filter %d of %d", t.Tid, i, len(p.core.SeccompFilters))
			}
		}
	}
	return nil
}
