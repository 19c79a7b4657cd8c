package dumpcore

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/netlock"
)

// fileTable assigns ids to files: one entry per open file description
// (shared by every fd that refers to it) and one per path object (cwd,
// root, exe, mapped files).
type fileTable struct {
	// staleTrackers are userfaultfds ferry left in the process (pre-dump)
	// that this dump found without their image set: not the program's.
	staleTrackers map[int][]int // by pid
	// tcpEstablished (--tcp-established): established TCP connections are
	// dumped; repaired holds ferry's duplicates of those now in repair
	// mode, to be closed (after a kill: silently) or taken out of it.
	tcpEstablished bool
	tcpClose       bool // --tcp-close: established connections come back closed
	skipInFlight   bool // --skip-in-flight: a listener's pending connections are left behind
	repaired       []int
	// lock, when set, drops a connection's packets before it goes into
	// repair mode: a packet arriving while its state is read would make
	// that state inconsistent.
	lock func(netlock.Conn) error
	// extUnix: --ext-unix-sk (nil: not given; empty: any peer; else the
	// peers' inodes it names).
	extUnix []uint64
	// fileLocks (--file-locks): locks are dumped; otherwise one fails the
	// dump. lockSeen keeps each lock once (a POSIX lock shows on every fd
	// of its file, a flock or OFD lock on every fd of its description).
	fileLocks bool
	lockSeen  map[string]bool
	// cttyNr is the process's controlling terminal (stat tty_nr), 0: none.
	cttyNr     uint64
	cttyFg     int // its foreground process group (stat tpgid)
	ghostLimit int64
	entries    []*pb.FileEntry
	ghosts     []*pb.GhostFile
	ghostOf    map[[2]uint64]uint32 // device and inode -> the ghost carrying them
	remapLinks bool                 // --link-remap: see linkRemap
	mapped     map[uint32]bool      // entries made for file mappings (addMapped)
	byPath     map[string]uint32    // path objects by kind+dev+ino
	// inFlightOwner, while a socket's queue is read, is the process that
	// holds the socket (whose fd numbers an epoll in flight names).
	inFlightOwner int
	// ptyMasters are the pty masters of the dump, their queues read
	// last (takePtyQueues).
	ptyMasters []ptyMaster
	// ofds are the open file descriptions collected so far, by inode: an
	// fd of any process of the tree that shares one gets its id.
	ofds map[uint64][]ofd
}

// ofd is an open file description, first met as fd of pid.
type ofd struct {
	pid, fd int
	id      uint32
}

func newFileTable(ghostLimit int64) *fileTable {
	return &fileTable{ghostLimit: ghostLimit, byPath: map[string]uint32{}, ofds: map[uint64][]ofd{}}
}

func (ft *fileTable) add(e *pb.FileEntry) uint32 {
	e.Id = uint32(len(ft.entries) + 1)
	ft.entries = append(ft.entries, e)
	return e.Id
}

func statEntry(e *pb.FileEntry, st *unix.Stat_t) {
	e.Mode = st.Mode
	e.Size = st.Size
	e.MtimeNs = st.Mtim.Nano()
	e.Dev = st.Dev
	e.Ino = st.Ino
	e.Rdev = st.Rdev
	e.Uid = st.Uid
	e.Gid = st.Gid
}

const deletedSuffix = " (deleted)"

// addPath records /proc/PID/<link> (cwd, root, exe) as a path object.
func (ft *fileTable) addPath(pid int, link, typ string) (uint32, error) {
	lp := proc.Path(pid, link)
	target, err := os.Readlink(lp)
	if err != nil {
		return 0, err
	}
	var st unix.Stat_t
	if err := unix.Stat(lp, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", lp, err)
	}
	deleted := false
	if strings.HasSuffix(target, deletedSuffix) {
		if _, err := os.Stat(target); err != nil {
			if typ != "dir" || link != "cwd" {
				return 0, fmt.Errorf("%s of %d is a deleted file %s: %w", link, pid, target, ErrUnsupported)
			}
			target, deleted = strings.TrimSuffix(target, deletedSuffix), true
		}
	}
	key := fmt.Sprintf("%s:%d:%d", typ, st.Dev, st.Ino)
	if id, ok := ft.byPath[key]; ok {
		return id, nil
	}
	e := &pb.FileEntry{Type: typ, Path: target, DirDeleted: deleted}
	statEntry(e, &st)
	id := ft.add(e)
	ft.byPath[key] = id
	return id, nil
}

// addMapped records the file behind a file mapping.
func (ft *fileTable) addMapped(pid int, v *proc.Vma) (uint32, error) {
	lp := fmt.Sprintf("/proc/%d/map_files/%x-%x", pid, v.Start, v.End)
	var st unix.Stat_t
	if err := unix.Stat(lp, &st); err != nil {
		return 0, fmt.Errorf("stat mapped file %s: %w", v.Name, err)
	}
	// A shared mapping that is, or may be made (mprotect), writable needs
	// the file open for writing: VM_MAYWRITE ("mw") says it was.
	writable := v.Perms[3] == 's' && (v.Perms[1] == 'w' || v.Has("mw"))
	key := fmt.Sprintf("reg:%d:%d", st.Dev, st.Ino)
	if id, ok := ft.byPath[key]; ok {
		if writable && ft.mapped[id] {
			ft.entries[id-1].Flags = unix.O_RDWR
		}
		return id, nil
	}
	e := &pb.FileEntry{Type: "reg", Path: v.Name, Flags: unix.O_RDONLY}
	if writable {
		e.Flags = unix.O_RDWR
	}
	statEntry(e, &st)
	if name, ok := strings.CutSuffix(v.Name, deletedSuffix); ok && st.Nlink == 0 {
		// Unlinked: its contents travel in the images (up to --ghost-limit).
		e.Path = name
		if err := ft.addGhost(e, lp, &st); err != nil {
			return 0, fmt.Errorf("mapping at %#x: %w", v.Start, err)
		}
	}
	id := ft.add(e)
	ft.byPath[key] = id
	if ft.mapped == nil {
		ft.mapped = map[uint32]bool{}
	}
	ft.mapped[id] = true
	return id, nil
}

// collectFds records every open fd of pid.
// skip names an fd that is ferry's own (the parked dirty tracker).
func (ft *fileTable) collectFds(pid int, shellJob bool, skip int) (*pb.FdTable, error) {
	all, err := openFds(pid)
	if err != nil {
		return nil, err
	}
	fds := slices.DeleteFunc(all, func(n int) bool { return n == skip })
	table := &pb.FdTable{Pid: int32(pid)}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pidfd)

	for _, fd := range fds {
		info, err := proc.ReadFdInfo(pid, fd)
		if err != nil {
			return nil, err
		}
		cloexec := info.Flags&unix.O_CLOEXEC != 0
		// Same open file description as an earlier fd?
		id, at, err := ft.seenBefore(pid, fd, info.Ino)
		if err != nil {
			return nil, err
		}
		if id == 0 {
			if isFerryTracker(pid, fd, info) {
				if ft.staleTrackers == nil {
					ft.staleTrackers = map[int][]int{}
				}
				ft.staleTrackers[pid] = append(ft.staleTrackers[pid], fd)
				continue
			}
			e, err := ft.describeFd(pid, pidfd, fd, info, shellJob)
			if err != nil {
				return nil, fmt.Errorf("fd %d of %d: %w", fd, pid, err)
			}
			if err := fileOwner(e, pidfd, fd); err != nil {
				return nil, fmt.Errorf("fd %d of %d: %w", fd, pid, err)
			}
			id = ft.add(e)
			ft.ofds[info.Ino] = slices.Insert(ft.ofds[info.Ino], at, ofd{pid: pid, fd: fd, id: id})
		}
		fe := &pb.FdEntry{Fd: int32(fd), FileId: id, Cloexec: cloexec}
		if err := ft.addLocks(fe, info); err != nil {
			return nil, fmt.Errorf("fd %d of %d: %w", fd, pid, err)
		}
		table.Fds = append(table.Fds, fe)
	}
	return table, nil
}

// checkUnixPeers deals with connected unix sockets whose other end is not
// in the dump: with --ext-unix-sk a datagram socket connected to a bound
// socket (syslog's /dev/log, say) is connected to that name again on
// restore; anything else is refused.
func (ft *fileTable) checkUnixPeers(table *pb.FdTable) error {
	byIno := map[uint64]bool{}
	pendingOn := map[uint64]uint64{} // a client -> the listener its connection waits on
	listening := map[string]bool{}   // the listeners' names
	for _, f := range ft.entries {
		if f.Unix != nil {
			byIno[f.Ino] = true
			for _, p := range f.Unix.Pending {
				pendingOn[p] = f.Ino
			}
			if f.Unix.Listening {
				listening[string(f.Unix.Name)] = true
			}
		}
	}
	for _, fd := range table.Fds {
		f := ft.entries[fd.FileId-1]
		u := f.Unix
		if u == nil {
			continue
		}
		for _, p := range u.Pending {
			if p != 0 && !byIno[p] {
				return fmt.Errorf("fd %d of %d: unix listener %s: a connection waiting to be accepted from socket:[%d] outside the dump: %w",
					fd.Fd, table.Pid, unixName(u.Name), p, ErrUnsupported)
			}
		}
		if l, ok := pendingOn[f.Ino]; ok {
			// Its peer, not accepted yet, has no inode of its own.
			u.PendingOn, u.PeerClosed = l, false
			continue
		}
		if u.PeerIno != 0 && len(u.Name) > 0 && u.Type != unix.SOCK_DGRAM && !listening[string(u.Name)] {
			// A named end of a connection is an accepted one (it shows its
			// listener's name) when that listener is in the dump, or its
			// path is gone with it; one bound by the program itself is not
			// made again.
			if _, err := os.Lstat(string(u.Name)); u.Name[0] == 0 || err == nil {
				return fmt.Errorf("fd %d of %d: connected unix socket bound to %s: %w (only accepted ones and unnamed pairs)",
					fd.Fd, table.Pid, unixName(u.Name), ErrUnsupported)
			}
		}
		if u.PeerIno == 0 || byIno[u.PeerIno] || len(u.ExternalPeer) > 0 {
			continue
		}
		what := fmt.Sprintf("fd %d of %d: unix socket connected to socket:[%d] outside the process", fd.Fd, table.Pid, u.PeerIno)
		if !ft.extUnixSk(u.PeerIno) {
			return fmt.Errorf("%s: %w (--ext-unix-sk connects it to the peer's name again)", what, ErrUnsupported)
		}
		// A datagram socket is connected to the peer's name again; a
		// stream one makes a new connection to it (the peer's listener:
		// the server accepts a new client, as after a reconnect).
		d, err := diagUnix(int(table.Pid), u.PeerIno)
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if len(d.name) == 0 {
			return fmt.Errorf("%s: %w (the peer has no name to connect to)", what, ErrUnsupported)
		}
		if len(u.Queue) > 0 {
			return fmt.Errorf("%s: %w (%d messages queued from it would be lost)", what, ErrUnsupported, len(u.Queue))
		}
		u.ExternalPeer, u.PeerIno = d.name, 0
		f.Path = "unix:-> " + unixName(d.name)
	}
	return nil
}

// extUnixSk tells whether --ext-unix-sk allows the external peer ino.
func (ft *fileTable) extUnixSk(ino uint64) bool {
	if ft.extUnix == nil {
		return false
	}
	if len(ft.extUnix) == 0 {
		return true
	}
	for _, i := range ft.extUnix {
		if i == ino {
			return true
		}
	}
	return false
}

func (ft *fileTable) describeFd(pid, pidfd, fd int, info proc.FdInfo, shellJob bool) (*pb.FileEntry, error) {
	lp := proc.Path(pid, "fd/"+strconv.Itoa(fd))
	target, err := os.Readlink(lp)
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Stat(lp, &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", target, err)
	}
	e := &pb.FileEntry{Path: target, Flags: info.Flags &^ unix.O_CLOEXEC, Pos: info.Pos, MntId: int32(info.MntID)}
	statEntry(e, &st)
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		if kind, ok := nsFileKind(target); ok {
			// A namespace file (/proc/PID/ns/KIND): of the process's own
			// namespace, it is opened again from /proc/self/ns.
			own, err := os.Readlink(proc.Path(pid, "ns/"+kind))
			if err != nil || own != target {
				return nil, fmt.Errorf("%s: %w (a namespace file of another namespace than the process's own)", target, ErrUnsupported)
			}
			e.Type, e.Path = "nsfile", kind
			break
		}
		e.Type = "reg"
		if strings.HasSuffix(target, deletedSuffix) {
			if _, err := os.Lstat(target); errors.Is(err, os.ErrNotExist) || st.Nlink == 0 {
				e.Path = strings.TrimSuffix(target, deletedSuffix)
				if st.Nlink > 0 {
					// Its name is gone but the file lives on under
					// another: a copy would part from it.
					if err := ft.linkRemap(e, pidfd, fd); err != nil {
						return nil, err
					}
					break
				}
				if err := ft.addGhost(e, lp, &st); err != nil {
					return nil, err
				}
			}
		}
	case unix.S_IFDIR:
		e.Type = "dir"
		if strings.HasSuffix(target, deletedSuffix) {
			if _, err := os.Stat(target); err != nil {
				// A removed directory: made again for the open, and
				// removed again.
				e.Path, e.DirDeleted = strings.TrimSuffix(target, deletedSuffix), true
			}
		}
	case unix.S_IFLNK:
		// Only O_PATH|O_NOFOLLOW opens a symbolic link itself.
		e.Type = "symlink"
		if strings.HasSuffix(target, deletedSuffix) {
			if _, err := os.Lstat(target); err != nil {
				// Removed: its target is read through the descriptor.
				dup, err := unix.PidfdGetfd(pidfd, fd, 0)
				if err != nil {
					return nil, os.NewSyscallError("pidfd_getfd", err)
				}
				buf := make([]byte, unix.PathMax)
				n, err := unix.Readlinkat(dup, "", buf)
				unix.Close(dup)
				if err != nil {
					return nil, fmt.Errorf("%s: reading the removed symbolic link: %w", target, err)
				}
				e.Path, e.SymlinkTarget, e.SymlinkDeleted = strings.TrimSuffix(target, deletedSuffix), string(buf[:n]), true
			}
		}
	case unix.S_IFCHR:
		e.Type = "chr"
		if isPtmx(st.Rdev) || isPts(st.Rdev) {
			dup, err := unix.PidfdGetfd(pidfd, fd, 0)
			if err != nil {
				return nil, os.NewSyscallError("pidfd_getfd", err)
			}
			err = ft.describeTty(e, st.Rdev, dup, info)
			unix.Close(dup)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", target, err)
			}
		} else if unix.Major(st.Rdev) == 10 && unix.Minor(st.Rdev) == 200 && info.Extra["iff"] != "" {
			// /dev/net/tun attached to a tun or tap device: which, and
			// how (TUNGETIFF).
			dup, err := unix.PidfdGetfd(pidfd, fd, 0)
			if err != nil {
				return nil, os.NewSyscallError("pidfd_getfd", err)
			}
			ifr, err := unix.NewIfreq(info.Extra["iff"])
			if err == nil {
				err = unix.IoctlIfreq(dup, tungetiff, ifr)
			}
			unix.Close(dup)
			if err != nil {
				return nil, fmt.Errorf("%s (%s): TUNGETIFF: %w", target, info.Extra["iff"], err)
			}
			e.Type, e.TunIface, e.TunFlags = "tun", info.Extra["iff"], uint32(ifr.Uint16())
		} else if unix.Major(st.Rdev) == 5 && unix.Minor(st.Rdev) == 0 && !shellJob {
			// /dev/tty: the controlling terminal, whichever it is; opened
			// again once the restored session has its terminal.
			e.Type = "devtty"
		} else if isTTY(st.Rdev) {
			if !shellJob {
				return nil, fmt.Errorf("terminal %s: %w (use --shell-job to dump a job attached to a terminal)", target, ErrUnsupported)
			}
			e.ShellJobTty = true
		}
	case unix.S_IFSOCK:
		dup, err := unix.PidfdGetfd(pidfd, fd, 0)
		if err != nil {
			return nil, os.NewSyscallError("pidfd_getfd", err)
		}
		keep, err := ft.dumpSocket(e, pid, dup)
		if !keep {
			unix.Close(dup)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", target, err)
		}
	case unix.S_IFIFO:
		if !strings.HasPrefix(target, "pipe:") {
			if err := dumpFifo(e, pid, fd, target); err != nil {
				return nil, err
			}
			break
		}
		e.Type = "pipe"
		if err := dumpPipe(e, pidfd, fd); err != nil {
			return nil, err
		}
	default:
		switch target {
		case "anon_inode:[eventfd]":
			e.Type = "eventfd"
			cnt, err := strconv.ParseUint(info.Extra["eventfd-count"], 16, 64)
			if err != nil {
				return nil, fmt.Errorf("eventfd count %q: %w", info.Extra["eventfd-count"], err)
			}
			e.EventfdCount = cnt
			e.EventfdSemaphore = info.Extra["eventfd-semaphore"] == "1"
		case "anon_inode:inotify":
			if err := dumpInotify(e, pid, info); err != nil {
				return nil, err
			}
		case "anon_inode:[fanotify]":
			if err := dumpFanotify(e, pid, info); err != nil {
				return nil, err
			}
		case "anon_inode:[signalfd]":
			e.Type = "signalfd"
			m, err := strconv.ParseUint(info.Extra["sigmask"], 16, 64)
			if err != nil {
				return nil, fmt.Errorf("signalfd sigmask %q: %w", info.Extra["sigmask"], err)
			}
			e.SignalfdMask = m
		case "anon_inode:[timerfd]":
			e.Type = "timerfd"
			tf, err := parseTimerfd(info)
			if err != nil {
				return nil, err
			}
			e.Timerfd = tf
		case "anon_inode:[userfaultfd]":
			// The process's own (ferry's trackers are left out before).
			f := strings.Split(info.Extra["API"], ":")
			var err error
			if len(f) == 3 {
				e.UffdFeatures, err = strconv.ParseUint(f[1], 16, 64)
			}
			if len(f) != 3 || err != nil {
				return nil, fmt.Errorf("userfaultfd API %q: %w", info.Extra["API"], ErrUnsupported)
			}
			const initialized = 1 << 31 // kernel-internal UFFD_FEATURE_INITIALIZED
			e.Type, e.UffdFeatures = "userfaultfd", e.UffdFeatures&^initialized
		case "anon_inode:[pidfd]":
			// Of a process of the tree (checkPidfds), or of a dead one
			// (-1).
			target, err := strconv.Atoi(info.Extra["Pid"])
			if err != nil {
				return nil, fmt.Errorf("a pidfd of process %q: %w", info.Extra["Pid"], ErrUnsupported)
			}
			e.Type, e.PidfdPid = "pidfd", int32(target)
		case "anon_inode:[eventpoll]":
			e.Type = "epoll"
			name := proc.Path(pid, "fdinfo/"+strconv.Itoa(fd))
			raw, err := os.ReadFile(name)
			if err != nil {
				return nil, err
			}
			tgts, err := proc.ParseEpollTargets(name, raw)
			if err != nil {
				return nil, err
			}
			// The targets' numbers are those of the process that holds
			// the epoll, or, for one in flight (received into ferry),
			// of the process whose socket's queue holds it.
			owner := pid
			if ft.inFlightOwner != 0 {
				owner = ft.inFlightOwner
			}
			seen := map[int]int{} // registrations per number so far
			var fds []int
			for _, t := range tgts {
				et := &pb.EpollTarget{Tfd: int32(t.Tfd), Events: t.Events, Data: t.Data}
				toff := seen[t.Tfd]
				seen[t.Tfd]++
				if !kcmpEpollTfd(owner, t.Tfd, pid, fd, t.Tfd, toff) {
					if ft.inFlightOwner != 0 {
						return nil, fmt.Errorf("an epoll in flight: its target %d is no longer open under that number: %w", t.Tfd, ErrUnsupported)
					}
					// The number no longer holds the file: find an fd
					// that does.
					if fds == nil {
						if fds, err = openFds(pid); err != nil {
							return nil, err
						}
					}
					for _, c := range fds {
						if kcmpEpollTfd(pid, c, pid, fd, t.Tfd, toff) {
							et.Moved, et.SourceFd = true, int32(c)
							break
						}
					}
					if !et.Moved {
						return nil, fmt.Errorf("epoll target %d (registration %d under that number): %w (its file is open under no descriptor)", t.Tfd, toff, ErrUnsupported)
					}
				}
				e.Epoll = append(e.Epoll, et)
			}
		default:
			return nil, fmt.Errorf("%s: %w (file type %#o)", target, ErrUnsupported, st.Mode&unix.S_IFMT)
		}
	}
	return e, nil
}

// isFerryTracker recognises a dirty tracker an earlier pre-dump parked in
// the process: a userfaultfd whose API handshake asked for exactly
// ferry's tracking features (fdinfo "API: aa:FEATURES:IOCTLS").
func isFerryTracker(pid, fd int, info proc.FdInfo) bool {
	target, err := os.Readlink(proc.Path(pid, "fd/"+strconv.Itoa(fd)))
	if err != nil || target != "anon_inode:[userfaultfd]" {
		return false
	}
	f := strings.Split(info.Extra["API"], ":")
	if len(f) != 3 {
		return false
	}
	features, err := strconv.ParseUint(f[1], 16, 64)
	const initialized = 1 << 31 // kernel-internal UFFD_FEATURE_INITIALIZED
	return err == nil && features&^initialized == trackFeatures
}

// tungetiff is TUNGETIFF: _IOR('T', 210, unsigned int).
const tungetiff = 0x800454d2

// isTTY reports whether a char device is a terminal (pts, tty, console).
func isTTY(rdev uint64) bool {
	maj := unix.Major(rdev)
	return maj == 136 || maj == 4 || maj == 5
}

func (ft *fileTable) addGhost(e *pb.FileEntry, lp string, st *unix.Stat_t) error {
	id, key := uint32(len(ft.entries)+1), [2]uint64{st.Dev, st.Ino}
	if first, ok := ft.ghostOf[key]; ok {
		// Another name of a deleted file already carried.
		e.Ghost = true
		ft.ghosts = append(ft.ghosts, &pb.GhostFile{Id: id, SameAs: first, Mode: st.Mode, Size: st.Size})
		return nil
	}
	if ft.ghostOf == nil {
		ft.ghostOf = map[[2]uint64]uint32{}
	}
	ft.ghostOf[key] = id
	f, err := os.Open(lp)
	if err != nil {
		return err
	}
	defer f.Close()
	exts, err := dataExtents(int(f.Fd()), st.Size)
	if err != nil {
		return fmt.Errorf("deleted file %s: %w", e.Path, err)
	}
	var total int64
	for _, x := range exts {
		total += x[1] - x[0]
	}
	g := &pb.GhostFile{Id: id, Mode: st.Mode, Size: st.Size,
		Uid: st.Uid, Gid: st.Gid, MtimeNs: st.Mtim.Nano()}
	if name, ok := strings.CutPrefix(e.Path, "/memfd:"); ok {
		// A memfd is memory, not a file that was removed: no
		// --ghost-limit for it.
		var sfs unix.Statfs_t
		if unix.Fstatfs(int(f.Fd()), &sfs) == nil && sfs.Type == unix.TMPFS_MAGIC {
			g.Memfd, g.MemfdName = true, name
			if seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0); err == nil {
				g.Seals = uint32(seals)
			}
		}
	}
	if total > ft.ghostLimit && !g.Memfd {
		return fmt.Errorf("deleted file %s holds %d bytes of data, more than --ghost-limit %d: %w", e.Path, total, ft.ghostLimit, ErrUnsupported)
	}
	for _, x := range exts {
		b := make([]byte, x[1]-x[0])
		if _, err := f.ReadAt(b, x[0]); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read deleted file %s: %w", e.Path, err)
		}
		if len(exts) == 1 && x[0] == 0 && x[1] == st.Size {
			g.Data = b // no holes
			break
		}
		g.Extents = append(g.Extents, &pb.GhostExtent{Offset: x[0], Data: b})
	}
	e.Ghost = true
	ft.ghosts = append(ft.ghosts, g)
	return nil
}

// dataExtents lists the [start, end) ranges of file fd (size bytes) that
// hold data, holes left out (SEEK_DATA/SEEK_HOLE; a filesystem without
// them reports one extent).
func dataExtents(fd int, size int64) ([][2]int64, error) {
	var out [][2]int64
	for off := int64(0); off < size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole to the end
		}
		if err != nil {
			return [][2]int64{{0, size}}, nil
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			return [][2]int64{{0, size}}, nil
		}
		h = min(h, size)
		out = append(out, [2]int64{d, h})
		off = h
	}
	return out, nil
}

// dumpPipe records a pipe's capacity and queued bytes without consuming
// them: tee(2) from a duplicate of the target's fd into a private pipe.
func dumpPipe(e *pb.FileEntry, pidfd, fd int) error {
	dup, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return os.NewSyscallError("pidfd_getfd", err)
	}
	defer unix.Close(dup)
	size, err := unix.FcntlInt(uintptr(dup), unix.F_GETPIPE_SZ, 0)
	if err != nil {
		return os.NewSyscallError("fcntl(F_GETPIPE_SZ)", err)
	}
	e.PipeSize = int32(size)
	if e.Flags&unix.O_ACCMODE != unix.O_RDONLY {
		return nil // the data is recorded with the read end
	}
	e.PipeData, err = peekPipe(dup, size)
	return err
}

// dumpFifo records a named pipe: capacity and queued bytes, read (without
// consuming them) through a read description of its own, so that a
// process holding only the write end is covered too.
func dumpFifo(e *pb.FileEntry, pid, fd int, target string) error {
	e.Type = "fifo"
	if p, ok := strings.CutSuffix(target, deletedSuffix); ok {
		e.Path, e.FifoDeleted = p, true
	}
	r, err := os.OpenFile(proc.Path(pid, "fd/"+strconv.Itoa(fd)), os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return fmt.Errorf("FIFO %s: %w", target, err)
	}
	defer r.Close()
	size, err := unix.FcntlInt(r.Fd(), unix.F_GETPIPE_SZ, 0)
	if err != nil {
		return os.NewSyscallError("fcntl(F_GETPIPE_SZ)", err)
	}
	e.PipeSize = int32(size)
	e.PipeData, err = peekPipe(int(r.Fd()), size)
	return err
}

// peekPipe returns what pipe fd holds, without consuming it (tee(2) into a
// private pipe of the same capacity).
func peekPipe(fd, size int) ([]byte, error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, err
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if _, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, size); err != nil {
		return nil, os.NewSyscallError("fcntl(F_SETPIPE_SZ)", err)
	}
	n, err := unix.Tee(fd, p[1], size, unix.SPLICE_F_NONBLOCK)
	if err != nil && !errors.Is(err, unix.EAGAIN) {
		return nil, os.NewSyscallError("tee", err)
	}
	if n <= 0 {
		return nil, nil
	}
	data := make([]byte, n)
	for got := 0; got < int(n); {
		m, err := unix.Read(p[0], data[got:])
		if err != nil {
			return nil, os.NewSyscallError("read pipe copy", err)
		}
		got += m
	}
	return data, nil
}

// fileOwner records who gets the description's SIGIO (F_GETOWN_EX) and
// with which signal (F_GETSIG), read through a duplicate of fd.
func fileOwner(e *pb.FileEntry, pidfd, fd int) error {
	dup, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return os.NewSyscallError("pidfd_getfd", err)
	}
	defer unix.Close(dup)
	typ, pid, err := getOwnerEx(dup)
	if err != nil {
		return nil // not every file has an owner (O_PATH)
	}
	sig, err := unix.FcntlInt(uintptr(dup), unix.F_GETSIG, 0)
	if err != nil {
		return nil
	}
	e.OwnerType, e.OwnerPid, e.OwnerSig = typ, pid, int32(sig)
	return nil
}

// seenBefore returns the id of the open file description that fd of pid
// refers to if an fd collected before (of this process or another of the
// tree) refers to it too, else 0, and where fd goes in ft.ofds[ino]. ino
// is the file's inode. The descriptions of an inode are kept in kcmp's
// order, so a lookup is a binary search: many files share one inode
// (every eventfd and epoll the anonymous inode).
func (ft *fileTable) seenBefore(pid, fd int, ino uint64) (id uint32, at int, err error) {
	list := ft.ofds[ino]
	lo, hi := 0, len(list)
	for lo < hi {
		mid := (lo + hi) / 2
		c, err := kcmpOrder(list[mid].pid, pid, list[mid].fd, fd)
		if err != nil {
			return 0, 0, err
		}
		switch c {
		case 0:
			return list[mid].id, mid, nil
		case 1: // list[mid] < fd's
			lo = mid + 1
		default:
			hi = mid
		}
	}
	return 0, lo, nil
}

// kcmpOrder compares fd a of pid pa with fd b of pid pb as kcmp(2)
// KCMP_FILE does: 0 the same open file description, 1 a's is lower, 2 a's
// is higher (in an order the kernel keeps stable while it runs).
func kcmpOrder(pa, pb, a, b int) (int, error) {
	const kcmpFile = 0
	r, _, errno := unix.Syscall6(unix.SYS_KCMP, uintptr(pa), uintptr(pb), kcmpFile, uintptr(a), uintptr(b), 0)
	if errno != 0 {
		return 0, os.NewSyscallError("kcmp", errno)
	}
	return int(r), nil
}

// addLocks records the locks fdinfo shows for fe (see fileTable.lockSeen).
func (ft *fileTable) addLocks(fe *pb.FdEntry, info proc.FdInfo) error {
	for _, line := range info.Locks {
		// "N: KIND ADVISORY MODE PID MAJ:MIN:INO START END"; "N: -> ..."
		// lines are requests waiting for the lock, not locks.
		f := strings.Fields(line)
		if len(f) < 8 || f[1] == "->" {
			continue
		}
		kind, mode, dev, start, end := f[1], f[3], f[5], f[6], f[7]
		var k string
		switch kind {
		case "POSIX":
			k = "posix"
		case "FLOCK":
			k = "flock"
		case "OFDLCK":
			k = "ofd"
		case "LEASE":
			// "N: LEASE ACTIVE|BREAKING READ|WRITE|UNLCK ...": a lease of
			// the description (one being broken: see leaseBreaking).
			if f[2] != "ACTIVE" && f[2] != "BREAKING" {
				return fmt.Errorf("lease on %s in state %s: %w", dev, strings.ToLower(f[2]), ErrUnsupported)
			}
			k = "lease"
		default:
			return fmt.Errorf("%s lock on %s: %w", strings.ToLower(kind), dev, ErrUnsupported)
		}
		if !ft.fileLocks {
			return fmt.Errorf("holds a %s lock: %w (dump file locks with --file-locks)", k, ErrUnsupported)
		}
		owner := fmt.Sprint(fe.FileId)
		if k == "posix" {
			owner = dev // the process's, on the file
		}
		key := strings.Join([]string{k, owner, mode, start, end}, " ")
		if ft.lockSeen[key] {
			continue
		}
		if ft.lockSeen == nil {
			ft.lockSeen = map[string]bool{}
		}
		ft.lockSeen[key] = true
		l := &pb.FileLock{Kind: k, Write: mode == "WRITE"}
		if kind == "LEASE" && f[2] == "BREAKING" {
			leaseBreaking(l, mode, info.Flags)
		}
		var err error
		if l.Start, err = strconv.ParseInt(start, 10, 64); err != nil {
			return fmt.Errorf("lock %q: %w", line, err)
		}
		if end != "EOF" {
			e, err := strconv.ParseInt(end, 10, 64)
			if err != nil {
				return fmt.Errorf("lock %q: %w", line, err)
			}
			l.Len = e - l.Start + 1
		}
		fe.Locks = append(fe.Locks, l)
	}
	return nil
}

// leaseBreaking fills in l for a lease being broken, of a description
// opened with flags. The kernel shows what the lease is being broken to
// (mode), not what it was: a lease downgrading to READ was a write lease;
// one going away was a read lease if the description is read-only (a
// read lease needs that; a write lease on such a description, going away
// the same way, is told apart by nothing the process can see), else a
// write lease.
func leaseBreaking(l *pb.FileLock, mode string, flags uint32) {
	if mode == "READ" {
		l.BreakTo, l.Write = "read", true
		return
	}
	l.BreakTo, l.Write = "unlock", flags&unix.O_ACCMODE != unix.O_RDONLY
}

// parseTimerfd reads a timerfd's fdinfo: "clockid: 1", "ticks: 0",
// "settime flags: 00", "it_value: (9, 998671303)", "it_interval: (1, 0)".
func parseTimerfd(info proc.FdInfo) (*pb.Timerfd, error) {
	t := &pb.Timerfd{}
	clock, err1 := strconv.Atoi(info.Extra["clockid"])
	ticks, err2 := strconv.ParseUint(info.Extra["ticks"], 10, 64)
	flags, err3 := strconv.ParseInt(info.Extra["settime flags"], 8, 32)
	if err := errors.Join(err1, err2, err3); err != nil {
		return nil, fmt.Errorf("timerfd fdinfo: %w", err)
	}
	t.Clockid, t.Ticks, t.SettimeFlags = int32(clock), ticks, int32(flags)
	for _, f := range []struct {
		key string
		v   *int64
	}{{"it_value", &t.ValueNs}, {"it_interval", &t.IntervalNs}} {
		var sec, nsec int64
		if _, err := fmt.Sscanf(info.Extra[f.key], "(%d, %d)", &sec, &nsec); err != nil {
			return nil, fmt.Errorf("timerfd %s %q: %w", f.key, info.Extra[f.key], err)
		}
		*f.v = sec*1e9 + nsec
	}
	return t, nil
}

// linkRemap handles an open file whose name was removed while it keeps
// other names (hard links): with --link-remap the dump gives it a name of
// its own, beside the removed one, for the restore to open (and remove);
// otherwise the dump is refused, since a copy would part from the file.
func (ft *fileTable) linkRemap(e *pb.FileEntry, pidfd, fd int) error {
	if !ft.remapLinks {
		return fmt.Errorf("%s was removed but lives on under another name: %w (--link-remap links it to a name of its own for the restore)", e.Path, ErrUnsupported)
	}
	dup, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return os.NewSyscallError("pidfd_getfd", err)
	}
	defer unix.Close(dup)
	name := filepath.Join(filepath.Dir(e.Path), fmt.Sprintf(".ferry-link-remap.%d.%d", e.Ino, len(ft.entries)+1))
	if err := unix.Linkat(dup, "", unix.AT_FDCWD, name, unix.AT_EMPTY_PATH); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("--link-remap: linking %s to %s: %w", e.Path, name, err)
	}
	e.Path, e.LinkRemap = name, true
	return nil
}

// openFds lists the fd numbers open in process pid, in order.
func openFds(pid int) ([]int, error) {
	ents, err := os.ReadDir(proc.Path(pid, "fd"))
	if err != nil {
		return nil, err
	}
	var out []int
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, n)
		}
	}
	sort.Ints(out)
	return out, nil
}

// nsFileKind tells the kind of namespace a descriptor's link names
// ("net:[4026531833]" is "net"), if it names one.
func nsFileKind(target string) (string, bool) {
	kind, rest, ok := strings.Cut(target, ":[")
	if !ok || !strings.HasSuffix(rest, "]") {
		return "", false
	}
	switch kind {
	case "net", "mnt", "pid", "uts", "ipc", "user", "cgroup", "time", "pid_for_children", "time_for_children":
		_, err := strconv.ParseUint(strings.TrimSuffix(rest, "]"), 10, 64)
		return kind, err == nil
	}
	return "", false
}
