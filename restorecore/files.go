package restorecore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/ptyq"
	"github.com/ferrycr/ferry/uffd"
)

// restoreFiles opens every file object inside the target (remote openat,
// pipe2), parks each on a high fd, dup3s it to every number that referred
// to it, then closes the parked copies.
func (b *builder) restoreFiles() error {
	if b.p.core.FilesSharedWith != 0 {
		return nil // the parent's table, restored with the parent
	}
	fds := append([]*pb.FdEntry(nil), b.p.fds.Fds...)
	sort.Slice(fds, func(i, j int) bool { return fds[i].Fd < fds[j].Fd })
	base := uint64(0)
	if len(fds) > 0 {
		base = uint64(fds[len(fds)-1].Fd) + 1
	}
	if err := b.clearFds(base); err != nil {
		return err
	}
	if len(fds) == 0 {
		return nil
	}
	b.objFds = map[uint32]int{}
	pipes := map[uint64][2]int{} // pipe inode -> parked read, write fds
	pipeEndTaken := map[[2]uint64]bool{}
	fifos := map[uint64]int{} // FIFO inode -> parked read-write helper fd
	hungUp := map[int32]int{} // hung-up pty index -> the parked master made for it
	var ghosts []func()       // removing the stand-ins once open, in order
	defer func() {
		for _, drop := range ghosts {
			drop()
		}
	}()
	park := func(fd uint64) (int, error) {
		nfd, err := b.sys(unix.SYS_FCNTL, fd, unix.F_DUPFD_CLOEXEC, base)
		if err != nil {
			return 0, fmt.Errorf("park fd %d above %d: %w", fd, base, err)
		}
		b.sys(unix.SYS_CLOSE, fd)
		return int(nfd), nil
	}
	// Pty masters first: their slaves cannot be opened before them.
	sort.SliceStable(fds, func(i, j int) bool {
		return b.r.is.files[fds[i].FileId].GetType() == "ptmx" && b.r.is.files[fds[j].FileId].GetType() != "ptmx"
	})
	// create makes the object of file f inside the process and returns
	// its parked fd; e is the fd entry it is made for (Fd -1: a file in
	// flight in a unix socket's queue).
	var create func(e *pb.FdEntry, f *pb.FileEntry) (int, error)
	// Files in flight in unix sockets' queues: made like the others, sent
	// with their message, and their fds here closed with the parked ones.
	var inFlightFds []int
	// Epolls in flight: registered once every fd sits at its number, like
	// the others, through the fd that sent them.
	type inFlightEpoll struct {
		fd int
		f  *pb.FileEntry
	}
	var inFlightEpolls []inFlightEpoll
	inFlight := func(ids []uint32) ([]int, error) {
		var out []int
		for _, id := range ids {
			f, ok := b.r.is.files[id]
			if !ok {
				return nil, fmt.Errorf("file id %d not in files.img", id)
			}
			fd, err := create(&pb.FdEntry{Fd: -1, FileId: id}, f)
			if err != nil {
				return nil, err
			}
			out = append(out, fd)
			inFlightFds = append(inFlightFds, fd)
			if f.Type == "epoll" {
				inFlightEpolls = append(inFlightEpolls, inFlightEpoll{fd, f})
			}
		}
		return out, nil
	}
	// makeHere makes file g in this process ahead of its turn (another
	// file needs it first); madeHere says who else will take it.
	makeHere := func(g *pb.FileEntry) error {
		fd, err := create(&pb.FdEntry{Fd: -1, FileId: g.Id}, g)
		if err == nil {
			b.madeHere(g.Id, fd)
		}
		return err
	}
	defer b.dropFerryPidfd()
	if (len(b.r.held) > 0 || len(b.r.heldPipes) > 0 || len(b.r.opts.InheritFds) > 0) && b.ferryPidfd == 0 {
		// Parked like the rest: opened where it falls, it could take a
		// number a file is about to be placed at.
		raw, err := b.sys(unix.SYS_PIDFD_OPEN, uint64(os.Getpid()), 0)
		if err != nil {
			return err
		}
		fd, err := park(raw)
		if err != nil {
			return err
		}
		b.ferryPidfd = uint64(fd)
	}
	create = func(e *pb.FdEntry, f *pb.FileEntry) (int, error) {
		if h, ok := b.r.opts.InheritFds[f.Path]; ok && f.Path != "" {
			// Given by the caller (--inherit-fd).
			raw, err := b.take(h)
			if err != nil {
				return 0, fmt.Errorf("fd %d (%s, inherited): %w", e.Fd, f.Path, err)
			}
			return park(raw)
		}
		if h, ok := b.r.held[f.Id]; ok {
			// Made by another process of the tree already.
			raw, err := b.take(h)
			if err != nil {
				return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
			}
			return park(raw)
		}
		var fd int
		var err error
		switch f.Type {
		case "pipe":
			ends, ok := pipes[f.Ino]
			if h, held := b.r.heldPipes[f.Ino]; !ok && held {
				// Made by another process of the tree already.
				for i := range ends {
					raw, err := b.take(h[i])
					if err != nil {
						return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
					}
					if ends[i], err = park(raw); err != nil {
						return 0, err
					}
				}
				pipes[f.Ino], ok = ends, true
			}
			if !ok {
				ends, err = b.newPipe(f, park)
				if err != nil {
					return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
				}
				pipes[f.Ino] = ends
				if b.r.multiPipes[f.Ino] {
					var h [2]int
					for i := range h {
						if h[i], err = b.localFd(ends[i]); err != nil {
							return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
						}
					}
					b.r.heldPipes[f.Ino] = h
				}
			}
			end := 1
			if f.Flags&unix.O_ACCMODE == unix.O_RDONLY {
				end = 0
			}
			fd = ends[end]
			key := [2]uint64{f.Ino, uint64(end)}
			if pipeEndTaken[key] {
				// Another description of the same end (opened through
				// /proc/PID/fd, say): its own flags.
				raw, err := b.openIn(fmt.Sprintf("/proc/self/fd/%d", fd), f)
				if err != nil {
					return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
				}
				if fd, err = park(raw); err != nil {
					return 0, err
				}
				break
			}
			pipeEndTaken[key] = true
			if f.Flags&unix.O_NONBLOCK != 0 {
				if _, err := b.sys(unix.SYS_FCNTL, uint64(fd), unix.F_SETFL, unix.O_NONBLOCK); err != nil {
					return 0, err
				}
			}
		case "eventfd":
			if fd, err = b.newEventfd(f, park); err != nil {
				return 0, fmt.Errorf("fd %d (eventfd): %w", e.Fd, err)
			}
		case "userfaultfd":
			if fd, err = b.newUserfaultfd(f, park); err != nil {
				return 0, fmt.Errorf("fd %d (userfaultfd): %w", e.Fd, err)
			}
		case "ptmx", "pts":
			if f.Tty == nil {
				return 0, fmt.Errorf("fd %d: terminal without its description", e.Fd)
			}
			if f.Type == "pts" && f.Tty.HungUp {
				// The slave of a pty of its own whose master is closed
				// once every such fd is open.
				m, ok := hungUp[f.Tty.Index]
				if !ok {
					raw, err := b.openIn("/dev/ptmx", &pb.FileEntry{Flags: unix.O_RDWR})
					if err != nil {
						return 0, fmt.Errorf("fd %d (hung-up %s): %w", e.Fd, f.Path, err)
					}
					if m, err = park(raw); err != nil {
						return 0, err
					}
					if err := b.ioctlInt(m, tiocsptlck, 0); err != nil {
						return 0, err
					}
					hungUp[f.Tty.Index] = m
				}
				raw, err := b.sys(unix.SYS_IOCTL, uint64(m), tiocgptpeer, uint64(f.Flags&unix.O_ACCMODE|unix.O_NOCTTY))
				if err != nil {
					return 0, fmt.Errorf("fd %d (hung-up %s): %w", e.Fd, f.Path, err)
				}
				fd, err = park(raw)
			} else if f.Type == "ptmx" {
				fd, err = b.openPtmx(f, park)
			} else if m := b.r.ptyMaster(f.Tty.Index); m != nil && !b.made(m.Id) {
				// Its master is made later (or by a process made later):
				// made here first, since a slave needs it.
				if err := makeHere(m); err != nil {
					return 0, fmt.Errorf("fd %d (master of %s): %w", e.Fd, f.Path, err)
				}
				fd, err = b.openPts(f, park)
			} else {
				fd, err = b.openPts(f, park)
			}
			if err != nil {
				return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
			}
			if f.Tty.Ctty {
				b.ctty = &ctty{fd: int(e.Fd), parked: fd, fgPgrp: f.Tty.FgPgrp}
			}
		case "unix":
			if f.Unix == nil {
				return 0, fmt.Errorf("fd %d: unix socket without its description", e.Fd)
			}
			if f.Unix.PeerClosed && f.Unix.Type == unix.SOCK_DGRAM && len(f.Unix.Name) > 0 {
				// Bound, with messages from senders gone: bound again
				// (others may still send to it), its queue sent to its
				// name.
				if fd, err = b.newUnixSocket(f, park); err == nil {
					err = b.refillByName(fd, f.Unix, inFlight)
				}
				if err != nil {
					return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
				}
				break
			}
			if f.Unix.PeerClosed {
				if fd, err = b.newUnixOrphan(f, park, inFlight); err != nil {
					return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
				}
				break
			}
			if f.Unix.PendingOn != 0 {
				// A client whose connection waits to be accepted: made
				// with its listener, which connects its clients in order.
				l := b.r.unixByIno(f.Unix.PendingOn)
				if l == nil {
					return 0, fmt.Errorf("fd %d (%s): listener socket:[%d] not in the images: %w", e.Fd, f.Path, f.Unix.PendingOn, ErrValidation)
				}
				if !b.made(l.Id) {
					if err := makeHere(l); err != nil {
						return 0, err
					}
				}
				if fd, ok := b.objFds[f.Id]; ok {
					return fd, nil
				}
				return 0, fmt.Errorf("fd %d (%s): its connection to listener %s was not made", e.Fd, f.Path, l.Path)
			}
			if f.Unix.PeerIno == 0 {
				if fd, err = b.newUnixSocket(f, park); err != nil {
					return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
				}
				if len(f.Unix.Pending) > 0 {
					b.objFds[f.Id] = fd
					if err := b.connectPending(fd, f, park); err != nil {
						return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
					}
				}
				break
			}
			peer := b.r.unixByIno(f.Unix.PeerIno)
			if peer == nil {
				return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, errNoPeer)
			}
			if f.Unix.Type == unix.SOCK_DGRAM && (len(f.Unix.Name) > 0 || len(peer.Unix.Name) > 0) {
				// Bound and connected by names, as it was: its own name
				// first (a peer may be connected to it), then its peer
				// made if it is not yet (here, and held for the process
				// that has it), then connected to the peer's name.
				if fd, err = b.newUnixSocket(f, park); err != nil {
					return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
				}
				b.objFds[f.Id] = fd
				if peer.Id != f.Id && !b.made(peer.Id) {
					if err := makeHere(peer); err != nil {
						return 0, err
					}
				}
				if err := b.connectUnix(fd, peer.Unix.Name); err != nil {
					return 0, fmt.Errorf("fd %d (%s): connect to %s: %w", e.Fd, f.Path, peer.Path, err)
				}
				if len(f.Unix.Name) > 0 {
					err = b.refillByName(fd, f.Unix, inFlight)
				} else if len(f.Unix.Queue) > 0 {
					err = fmt.Errorf("%d messages queued on an unnamed socket connected to a named one: %w", len(f.Unix.Queue), ErrValidation)
				}
				if err != nil {
					return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
				}
				break
			}
			var pfd int
			if fd, pfd, err = b.newUnixPair(f, peer, park, inFlight); err != nil {
				return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
			}
			b.objFds[peer.Id] = pfd
		case "inet":
			if fd, err = b.newInetSocket(f, park); err != nil {
				return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Path, err)
			}
		case "tun":
			// /dev/net/tun attached again to its device (made by the
			// network namespace's restore; else made here).
			raw, err := b.openIn("/dev/net/tun", f)
			if err != nil {
				return 0, fmt.Errorf("fd %d: %w", e.Fd, err)
			}
			// The device's own flags where the images have it: TUNGETIFF's
			// answer mixes in IFF_NOFILTER, the bit of IFF_NO_PI.
			flags := f.TunFlags
			for _, l := range b.r.is.inv.GetNetNs().GetLinks() {
				if l.Kind == "tun" && l.Name == f.TunIface {
					flags = l.TunFlags
				}
			}
			ifr := make([]byte, 40) // struct ifreq: the name, then the flags
			copy(ifr, f.TunIface)
			binary.LittleEndian.PutUint16(ifr[16:], uint16(flags))
			a, err := b.put(scratchOptVal, ifr)
			if err != nil {
				b.sys(unix.SYS_CLOSE, raw)
				return 0, err
			}
			if _, err := b.sys(unix.SYS_IOCTL, raw, tunsetiff, a); err != nil {
				b.sys(unix.SYS_CLOSE, raw)
				return 0, fmt.Errorf("fd %d: attach to %s (TUNSETIFF): %w", e.Fd, f.TunIface, err)
			}
			if fd, err = park(raw); err != nil {
				return 0, err
			}
			if b.r.tunFds == nil {
				b.r.tunFds = map[string][2]int{}
			}
			b.r.tunFds[f.TunIface] = [2]int{b.pid, int(e.Fd)} // where it ends up
		case "fifo":
			helper, ok := fifos[f.Ino]
			if !ok {
				if helper, err = b.openFifo(f, park, &ghosts); err != nil {
					return 0, fmt.Errorf("fd %d (FIFO %s): %w", e.Fd, f.Path, err)
				}
				fifos[f.Ino] = helper
			}
			// Each description with its own flags, through the helper:
			// opening the FIFO for reading or writing alone would wait for
			// the other side.
			raw, err := b.openIn(fmt.Sprintf("/proc/self/fd/%d", helper), f)
			if err != nil {
				return 0, fmt.Errorf("fd %d (FIFO %s): %w", e.Fd, f.Path, err)
			}
			if fd, err = park(raw); err != nil {
				return 0, err
			}
		case "inotify":
			if fd, err = b.newInotify(f, park); err != nil {
				return 0, fmt.Errorf("fd %d (inotify): %w", e.Fd, err)
			}
		case "devtty":
			// /dev/tty opens the controlling terminal: the session's,
			// taken now if this process leads it.
			if pt := b.p.pstree; pt.Sid == pt.Pid {
				if err := b.takeCttyNow(); err != nil {
					return 0, fmt.Errorf("fd %d (/dev/tty): %w", e.Fd, err)
				}
			}
			raw, err := b.openIn("/dev/tty", f)
			if err != nil {
				return 0, fmt.Errorf("fd %d: %w", e.Fd, err)
			}
			if fd, err = park(raw); err != nil {
				return 0, err
			}
		case "fanotify":
			if fd, err = b.newFanotify(f, park); err != nil {
				return 0, fmt.Errorf("fd %d (fanotify): %w", e.Fd, err)
			}
		case "pidfd":
			// Of a process of the tree, whose PID is the same again, or
			// of a dead process (a stand-in that dies at the end of the
			// restore). PIDFD_NONBLOCK is O_NONBLOCK, PIDFD_THREAD is
			// O_EXCL.
			target := int(f.PidfdPid)
			if target == -1 {
				if target, err = b.r.deadProcess(f.Ino); err != nil {
					return 0, fmt.Errorf("fd %d (pidfd of a dead process): %w", e.Fd, err)
				}
			}
			raw, err := b.sys(unix.SYS_PIDFD_OPEN, uint64(target), uint64(f.Flags&(unix.O_NONBLOCK|unix.O_EXCL)))
			if err != nil {
				return 0, fmt.Errorf("fd %d (pidfd): %w", e.Fd, err)
			}
			if fd, err = park(raw); err != nil {
				return 0, err
			}
		case "signalfd", "timerfd":
			if fd, err = b.newEventFile(f, park); err != nil {
				return 0, fmt.Errorf("fd %d (%s): %w", e.Fd, f.Type, err)
			}
		case "epoll":
			raw, err := b.sys(unix.SYS_EPOLL_CREATE1, unix.EPOLL_CLOEXEC)
			if err != nil {
				return 0, fmt.Errorf("fd %d (epoll): %w", e.Fd, err)
			}
			if fd, err = park(raw); err != nil {
				return 0, err
			}
		default:
			path := f.Path
			if f.ShellJobTty {
				n := min(int(e.Fd), 2)
				path = fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), n)
			}
			if f.Ghost {
				// Removed once the whole tree holds it (removeGhosts).
				path, err = b.ghostPath(f)
				if err != nil {
					return 0, fmt.Errorf("fd %d: %w", e.Fd, err)
				}
			}
			if f.Type == "nsfile" {
				// The process's own namespace of that kind.
				path = "/proc/self/ns/" + f.Path
			}
			if f.SymlinkDeleted {
				// A removed symbolic link: made again under its old name
				// (else beside it), opened, and removed again.
				fs := b.fsFor(f.Path)
				if path, err = remakeSymlink(fs, f); err != nil {
					return 0, fmt.Errorf("fd %d: %w", e.Fd, err)
				}
				ghosts = append(ghosts, fs.dropper(path))
			}
			if f.LinkRemap {
				ghosts = append(ghosts, hostFS{}.dropper(path)) // the dump's name for it goes once it is open
			}
			if f.Type == "dir" && f.DirDeleted {
				if cwd, ok := b.r.is.files[b.p.core.CwdId]; ok && cwd.DirDeleted && cwd.Dev == f.Dev && cwd.Ino == f.Ino && b.cwdEntered() {
					// The removed working directory, entered already
					// (restoreCwd): the same directory again.
					path = "."
				} else {
					// A removed directory: a stand-in, opened, then removed.
					var made []string
					fs := b.fsFor(f.Path)
					path, made, err = standIn(fs, f)
					for _, d := range made { // innermost first
						ghosts = append(ghosts, fs.dropper(d))
					}
					if err != nil {
						return 0, fmt.Errorf("fd %d: %w", e.Fd, err)
					}
				}
			}
			var raw uint64
			if h, ok := b.memfdFor(f); ok && f.Flags&unix.O_ACCMODE != unix.O_RDONLY {
				// memfd_create's own description: an open for writing
				// would count as a writer and forbid executing it.
				if raw, err = b.take(h); err == nil && f.Pos != 0 {
					_, err = b.sys(unix.SYS_LSEEK, raw, uint64(f.Pos), 0)
				}
				const settable = unix.O_APPEND | unix.O_NONBLOCK | unix.O_DIRECT | unix.O_NOATIME
				if fl := f.Flags & settable; err == nil && fl != 0 {
					_, err = b.sys(unix.SYS_FCNTL, raw, unix.F_SETFL, uint64(fl))
				}
			} else {
				raw, err = b.openIn(path, f)
			}
			if err != nil {
				return 0, fmt.Errorf("fd %d: %w", e.Fd, err)
			}
			if fd, err = park(raw); err != nil {
				return 0, err
			}
		}
		return fd, nil
	}
	for _, e := range fds {
		if _, ok := b.objFds[e.FileId]; ok {
			continue
		}
		f, ok := b.r.is.files[e.FileId]
		if !ok {
			return fmt.Errorf("fd %d: file id %d not in files.img", e.Fd, e.FileId)
		}
		fd, err := create(e, f)
		if err != nil {
			return err
		}
		b.objFds[e.FileId] = fd
	}
	// What waited in the ptys this process made, queued again.
	for id, fd := range b.objFds {
		f := b.r.is.files[id]
		if _, taken := b.r.held[id]; taken || f == nil || f.Type != "ptmx" || f.Tty == nil {
			continue
		}
		if len(f.Tty.InData) == 0 && len(f.Tty.OutData) == 0 {
			continue
		}
		m, err := b.localFd(fd)
		if err != nil {
			return err
		}
		err = ptyq.Refill(m, f.Tty)
		unix.Close(m)
		if err != nil {
			return fmt.Errorf("pty %d: queued data: %w", f.Tty.Index, err)
		}
	}
	// Owners (F_SETOWN_EX, F_SETSIG) and O_ASYNC, on what this process
	// made (a description taken from ferry has them already).
	for id, fd := range b.objFds {
		if _, taken := b.r.held[id]; !taken {
			if err := b.setOwner(fd, b.r.is.files[id]); err != nil {
				return fmt.Errorf("file id %d: %w", id, err)
			}
		}
	}
	// What other processes of the tree hold too: ferry keeps a copy for
	// them.
	for id, fd := range b.objFds {
		if _, ok := b.r.held[id]; b.r.multi[id] && !ok {
			h, err := b.localFd(fd)
			if err != nil {
				return fmt.Errorf("file id %d: %w", id, err)
			}
			b.r.held[id] = h
		}
	}
	for _, e := range fds {
		flags := uint64(0)
		if e.Cloexec {
			flags = unix.O_CLOEXEC
		}
		if _, err := b.sys(unix.SYS_DUP3, uint64(b.objFds[e.FileId]), uint64(e.Fd), flags); err != nil {
			return fmt.Errorf("fd %d: %w", e.Fd, err)
		}
	}
	// epoll registrations name target fds by number: add them now that
	// every fd sits at its number.
	done := map[uint32]bool{}
	taken := map[int32]bool{}
	for _, e := range fds {
		taken[e.Fd] = true
	}
	for _, e := range fds {
		f := b.r.is.files[e.FileId]
		if f.Type != "epoll" || done[e.FileId] {
			continue
		}
		done[e.FileId] = true
		for _, t := range f.Epoll {
			if t.Moved {
				// Free in the final layout and not held now (by a
				// descriptor ferry parked there, say).
				_, err := os.Lstat(fmt.Sprintf("/proc/%d/fd/%d", b.pid, t.Tfd))
				if err := b.addMovedEpollTarget(e.Fd, t, taken[t.Tfd] || err == nil); err != nil {
					return fmt.Errorf("epoll fd %d: %w", e.Fd, err)
				}
				continue
			}
			if err := b.epollAdd(e.Fd, uint64(t.Tfd), t); errors.Is(err, unix.EEXIST) {
				// Registered twice under one number (two files that
				// held it in turn): only the one at the number now can
				// be registered again.
				b.r.log.Warn("epoll target registered twice under one fd number; keeping one", "epoll", e.Fd, "fd", t.Tfd)
				continue
			} else if err != nil {
				return fmt.Errorf("epoll fd %d: add fd %d: %w", e.Fd, t.Tfd, err)
			}
		}
	}
	for _, ep := range inFlightEpolls {
		for _, t := range ep.f.Epoll {
			if err := b.epollAdd(int32(ep.fd), uint64(t.Tfd), t); err != nil {
				return fmt.Errorf("epoll in flight: add fd %d: %w", t.Tfd, err)
			}
		}
	}
	parked := map[int]bool{}
	for _, fd := range b.objFds {
		parked[fd] = true
	}
	for _, ends := range pipes {
		parked[ends[0]], parked[ends[1]] = true, true
	}
	for _, h := range fifos {
		parked[h] = true
	}
	for _, m := range hungUp {
		parked[m] = true // closing it hangs the slaves up
	}
	for _, fd := range inFlightFds {
		parked[fd] = true
	}
	for fd := range parked {
		if _, err := b.sys(unix.SYS_CLOSE, uint64(fd)); err != nil {
			return err
		}
	}
	// Locks last: closing any fd of a file drops the POSIX locks the
	// process holds on it, so the parked copies must be gone first.
	for _, e := range fds {
		for _, l := range e.Locks {
			if err := b.takeLock(int(e.Fd), l, b.r.is.files[e.FileId]); err != nil {
				return fmt.Errorf("fd %d: %s lock: %w", e.Fd, l.Kind, err)
			}
		}
	}
	return nil
}

// setOwner gives the description at fd in the process its SIGIO owner
// and signal, and O_ASYNC, as dumped.
func (b *builder) setOwner(fd int, f *pb.FileEntry) error {
	if f == nil {
		return nil
	}
	if f.OwnerPid != 0 {
		own := make([]byte, 8)
		binary.LittleEndian.PutUint32(own, uint32(f.OwnerType))
		binary.LittleEndian.PutUint32(own[4:], uint32(f.OwnerPid))
		a, err := b.put(scratchOptVal, own)
		if err != nil {
			return err
		}
		if _, err := b.sys(unix.SYS_FCNTL, uint64(fd), unix.F_SETOWN_EX, a); err != nil {
			return fmt.Errorf("F_SETOWN_EX %d: %w", f.OwnerPid, err)
		}
	}
	if f.OwnerSig != 0 {
		if _, err := b.sys(unix.SYS_FCNTL, uint64(fd), unix.F_SETSIG, uint64(f.OwnerSig)); err != nil {
			return fmt.Errorf("F_SETSIG %d: %w", f.OwnerSig, err)
		}
	}
	if f.Flags&unix.O_ASYNC != 0 {
		fl, err := b.sys(unix.SYS_FCNTL, uint64(fd), unix.F_GETFL)
		if err != nil {
			return err
		}
		if _, err := b.sys(unix.SYS_FCNTL, uint64(fd), unix.F_SETFL, fl|unix.O_ASYNC); err != nil {
			return fmt.Errorf("O_ASYNC: %w", err)
		}
	}
	return nil
}

// newEventfd creates an eventfd with the dumped counter and flags.
// clearFds closes every fd of the process, but, in a new PID namespace,
// ferry's pidfd (see seedFerryPidfd), which it moves to base or above.
func (b *builder) clearFds(base uint64) error {
	if !b.r.seedKeepsFerry() {
		b.ferryPidfd = 0 // closed with the rest, if memory took one
		_, err := b.sys(unix.SYS_CLOSE_RANGE, 0, ^uint64(0)>>32, 0)
		return err
	}
	src := b.ferryPidfd
	if src == 0 {
		src = seedFerryPidfd
	}
	fd, err := b.sys(unix.SYS_FCNTL, src, unix.F_DUPFD_CLOEXEC, base)
	if err != nil {
		return fmt.Errorf("move ferry's pidfd %d above %d: %w", src, base, err)
	}
	if fd > 0 {
		if _, err := b.sys(unix.SYS_CLOSE_RANGE, 0, fd-1, 0); err != nil {
			return err
		}
	}
	if _, err := b.sys(unix.SYS_CLOSE_RANGE, fd+1, ^uint64(0)>>32, 0); err != nil {
		return err
	}
	b.ferryPidfd = fd
	b.r.ferryFd[b.p.pstree.Pid] = fd
	return nil
}

// newUserfaultfd makes the process's own userfaultfd: created inside it
// (its context serves the process's memory) with the features it had.
// Ferry keeps a copy (b.uffd) to register the memory with it at the end
// of the build (registerUffd), once nothing of the restore touches that
// memory any more.
func (b *builder) newUserfaultfd(f *pb.FileEntry, park func(uint64) (int, error)) (int, error) {
	raw, err := b.userfaultfd(uint64(unix.O_CLOEXEC | f.Flags&unix.O_NONBLOCK))
	if err != nil {
		return 0, err
	}
	local, err := b.localFd(int(raw))
	if err != nil {
		return 0, err
	}
	u, err := uffd.Adopt(local, f.UffdFeatures)
	if err != nil {
		unix.Close(local)
		return 0, err
	}
	if b.uffd != nil {
		b.uffd.Close()
	} else {
		b.r.cleanup = append(b.r.cleanup, func() {
			if b.uffd != nil {
				b.uffd.Close()
			}
		})
	}
	b.uffd = u
	return park(raw)
}

// registerUffd registers the memory that was registered with the
// process's own userfaultfd, in the same modes, and write-protects again
// the pages that were.
func (b *builder) registerUffd() error {
	if b.uffd == nil {
		return nil
	}
	defer func() {
		b.uffd.Close()
		b.uffd = nil
	}()
	for _, v := range b.p.mm.Vmas {
		if v.UffdModes == 0 {
			continue
		}
		if _, err := b.uffd.Register(v.Start, v.End-v.Start, uint64(v.UffdModes)); err != nil {
			return fmt.Errorf("VMA %#x, modes %#x: %w", v.Start, v.UffdModes, err)
		}
		for i := 0; i+1 < len(v.UffdWp); i += 2 {
			if err := b.uffd.WriteProtect(v.UffdWp[i], v.UffdWp[i+1]-v.UffdWp[i], true); err != nil {
				return fmt.Errorf("write-protect %#x-%#x: %w", v.UffdWp[i], v.UffdWp[i+1], err)
			}
		}
	}
	return nil
}

func (b *builder) newEventfd(f *pb.FileEntry, park func(uint64) (int, error)) (int, error) {
	flags := uint64(unix.EFD_CLOEXEC)
	if f.EventfdSemaphore {
		flags |= unix.EFD_SEMAPHORE
	}
	if f.Flags&unix.O_NONBLOCK != 0 {
		flags |= unix.EFD_NONBLOCK
	}
	raw, err := b.sys(unix.SYS_EVENTFD2, 0, flags)
	if err != nil {
		return 0, err
	}
	if f.EventfdCount > 0 {
		cnt := make([]byte, 8)
		binary.LittleEndian.PutUint64(cnt, f.EventfdCount)
		a, err := b.put(0, cnt)
		if err != nil {
			return 0, err
		}
		if _, err := b.sys(unix.SYS_WRITE, raw, a, 8); err != nil {
			return 0, fmt.Errorf("set counter %d: %w", f.EventfdCount, err)
		}
	}
	return park(raw)
}

// openIn opens path inside the target with the dumped flags and offset.
func (b *builder) openIn(path string, f *pb.FileEntry) (uint64, error) {
	a, err := b.putString(0, path)
	if err != nil {
		return 0, err
	}
	// O_NOCTTY: a session leader (sessions are made before files) would
	// take a terminal it opens as its controlling one; takeCtty decides.
	flags := uint64(f.Flags&^(unix.O_CREAT|unix.O_EXCL|unix.O_TRUNC)) | unix.O_CLOEXEC | unix.O_NOCTTY
	if f.Type != "dir" {
		// A file made with O_TMPFILE keeps the flag; reopened by name
		// (its ghost), it is a plain file.
		flags &^= unix.O_TMPFILE
	}
	fd, err := b.sys(unix.SYS_OPENAT, atFdcwd, a, flags, 0)
	if err != nil {
		return 0, fmt.Errorf("open %s: %w", path, err)
	}
	if f.Type == "reg" && f.Pos != 0 {
		if _, err := b.sys(unix.SYS_LSEEK, fd, uint64(f.Pos), 0); err != nil {
			b.sys(unix.SYS_CLOSE, fd)
			return 0, fmt.Errorf("seek %s to %d: %w", path, f.Pos, err)
		}
	}
	return fd, nil
}

// newPipe creates a pipe in the target with the dumped capacity and queued
// bytes; it returns the parked read and write ends.
func (b *builder) newPipe(f *pb.FileEntry, park func(uint64) (int, error)) ([2]int, error) {
	var ends [2]int
	if _, err := b.sys(unix.SYS_PIPE2, b.scratch(), 0); err != nil {
		return ends, err
	}
	raw := make([]byte, 8)
	if err := readMem(b.pid, b.scratch(), raw); err != nil {
		return ends, err
	}
	r, w := binary.LittleEndian.Uint32(raw), binary.LittleEndian.Uint32(raw[4:])
	var err error
	if ends[0], err = park(uint64(r)); err != nil {
		return ends, err
	}
	if ends[1], err = park(uint64(w)); err != nil {
		return ends, err
	}
	if f.PipeSize > 0 {
		if _, err := b.sys(unix.SYS_FCNTL, uint64(ends[1]), unix.F_SETPIPE_SZ, uint64(f.PipeSize)); err != nil {
			return ends, fmt.Errorf("pipe size %d: %w", f.PipeSize, err)
		}
	}
	data := f.PipeData
	// The queued bytes may have been recorded with the other end's entry.
	for _, o := range b.r.is.files {
		if o.Type == "pipe" && o.Ino == f.Ino && len(o.PipeData) > 0 {
			data = o.PipeData
		}
	}
	if len(data) > 0 {
		wf, err := os.OpenFile(fmt.Sprintf("/proc/%d/fd/%d", b.pid, ends[1]), os.O_WRONLY, 0)
		if err != nil {
			return ends, err
		}
		_, err = wf.Write(data)
		wf.Close()
		if err != nil {
			return ends, fmt.Errorf("refill pipe: %w", err)
		}
	}
	return ends, nil
}

// memfdFor returns ferry's memfd for file f, if f is one (made on first
// use).
func (b *builder) memfdFor(f *pb.FileEntry) (int, bool) {
	g, ok := b.r.is.ghosts[f.Id]
	if !f.Ghost || !ok {
		return 0, false
	}
	first := f
	if g.SameAs != 0 {
		first = b.r.is.files[g.SameAs]
		g = b.r.is.ghosts[g.SameAs]
	}
	if g == nil || !g.Memfd {
		return 0, false
	}
	if _, err := b.ghostPath(first); err != nil {
		return 0, false
	}
	h, ok := b.r.memfdOf[first.Id]
	return h, ok
}

// makeGhost recreates a deleted file's contents in a temporary file beside
// its old path (or in the temp dir); the caller removes it once the target
// holds it open.
func (b *builder) makeGhost(f *pb.FileEntry) (string, error) {
	g, ok := b.r.is.ghosts[f.Id]
	if !ok {
		return "", fmt.Errorf("deleted file %s: ghost-%d.img missing", f.Path, f.Id)
	}
	if g.SameAs != 0 {
		// Another name of the same deleted file: the same stand-in.
		first, ok := b.r.is.files[g.SameAs]
		if !ok || g.SameAs == f.Id {
			return "", fmt.Errorf("deleted file %s: ghost-%d.img names file %d, not in the image", f.Path, f.Id, g.SameAs)
		}
		return b.ghostPath(first)
	}
	var tf *os.File
	inner := "" // the path in the tree's own mount namespace, if there
	if g.Memfd {
		defer func() { b.r.memfdOf[f.Id] = b.r.memfds[len(b.r.memfds)-1].fd }()
		// Made by ferry and held until the tree is restored; the
		// processes open it through ferry's fd (each description its
		// own flags and offset) and the seals come last (sealMemfds).
		fd, err := unix.MemfdCreate(g.MemfdName, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
		if err != nil {
			return "", fmt.Errorf("memfd %s: %w", g.MemfdName, err)
		}
		keep, err := unix.Dup(fd)
		if err != nil {
			unix.Close(fd)
			return "", err
		}
		b.r.memfds = append(b.r.memfds, heldMemfd{fd: keep, seals: g.Seals})
		tf = os.NewFile(uintptr(fd), g.MemfdName)
	} else if images.OnOwnMount(b.r.is.inv.MntNs, f.Path) {
		// On a mount of the tree's own: made in its mount namespace.
		var err error
		if tf, inner, err = b.r.makeGhostInRoot(f); err != nil {
			return "", err
		}
	} else {
		// At its old path if that is free, so /proc/PID/fd shows the
		// same name; else beside it, else in the temp dir.
		var err error
		tf, err = os.OpenFile(f.Path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			tf, err = os.CreateTemp(filepath.Dir(f.Path), ".ferry-ghost-*")
		}
		if err != nil {
			tf, err = os.CreateTemp("", ".ferry-ghost-*")
			if err != nil {
				return "", err
			}
		}
	}
	defer tf.Close()
	path := tf.Name()
	drop := func() { os.Remove(path) }
	if d, ok := b.r.ghostDrops[f.Id]; ok {
		drop = d
	}
	if g.Memfd {
		path = fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), b.r.memfds[len(b.r.memfds)-1].fd)
		drop = func() {}
	}
	if _, err := tf.Write(g.Data); err != nil {
		drop()
		return "", err
	}
	for _, x := range g.Extents { // a file with holes: they stay holes
		if _, err := tf.WriteAt(x.Data, x.Offset); err != nil {
			drop()
			return "", err
		}
	}
	if err := tf.Truncate(g.Size); err != nil {
		drop()
		return "", err
	}
	// Owner first (chown clears set-id bits), then the mode (unix bits:
	// os.FileMode places set-id and sticky elsewhere), then the time.
	tf.Chown(int(g.Uid), int(g.Gid))
	unix.Fchmod(int(tf.Fd()), g.Mode&0o7777)
	if f.MtimeNs != 0 {
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, unix.NsecToTimespec(f.MtimeNs)}
		unix.UtimesNanoAt(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", tf.Fd()), ts, 0)
	}
	if inner != "" {
		return inner, nil
	}
	return path, nil
}

// takeLock takes a dumped file lock of the description f again, inside
// the process (POSIX locks belong to the process that takes them).
func (b *builder) takeLock(fd int, l *pb.FileLock, f *pb.FileEntry) error {
	if l.Kind == "lease" {
		typ := uint64(unix.F_RDLCK)
		if l.Write {
			typ = unix.F_WRLCK
		}
		if _, err := b.sys(unix.SYS_FCNTL, uint64(fd), unix.F_SETLEASE, typ); err != nil {
			return err
		}
		// F_SETLEASE made this process the description's owner. No
		// owner while the lease is broken again: the process heard of
		// that break before the dump and is not told twice. Then the
		// owner as dumped.
		if _, err := b.sys(unix.SYS_FCNTL, uint64(fd), unix.F_SETOWN, 0); err != nil {
			return fmt.Errorf("F_SETOWN: %w", err)
		}
		if l.BreakTo != "" {
			if err := b.breakLease(fd, l.BreakTo); err != nil {
				return err
			}
		}
		return b.setOwner(fd, f)
	}
	if l.Kind == "flock" {
		op := uint64(unix.LOCK_SH | unix.LOCK_NB)
		if l.Write {
			op = unix.LOCK_EX | unix.LOCK_NB
		}
		_, err := b.sys(unix.SYS_FLOCK, uint64(fd), op)
		return err
	}
	// struct flock: l_type, l_whence, (pad), l_start, l_len, l_pid, (pad).
	fl := make([]byte, 32)
	typ := uint16(unix.F_RDLCK)
	if l.Write {
		typ = unix.F_WRLCK
	}
	binary.LittleEndian.PutUint16(fl[0:], typ)
	binary.LittleEndian.PutUint64(fl[8:], uint64(l.Start))
	binary.LittleEndian.PutUint64(fl[16:], uint64(l.Len))
	a, err := b.put(scratchOptVal, fl)
	if err != nil {
		return err
	}
	cmd := uint64(unix.F_SETLK)
	if l.Kind == "ofd" {
		cmd = unix.F_OFD_SETLK
	}
	_, err = b.sys(unix.SYS_FCNTL, uint64(fd), cmd, a)
	return err
}

// breakLease starts breaking the lease of the description at fd in the
// process, as it was at the dump: an open of the same file that conflicts
// with it (for writing, or for reading to downgrade a write lease), made
// not to wait (O_NONBLOCK), starts the break and fails with EWOULDBLOCK.
// The kernel's lease-break-time counts again from here.
func (b *builder) breakLease(fd int, to string) error {
	mode := unix.O_WRONLY
	if to == "read" {
		mode = unix.O_RDONLY
	}
	h, err := unix.Open(fmt.Sprintf("/proc/%d/fd/%d", b.pid, fd), mode|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	switch {
	case err == nil:
		unix.Close(h)
		return fmt.Errorf("breaking its lease (to %s): opening the file again did not break it", to)
	case errors.Is(err, unix.EWOULDBLOCK):
		return nil
	default:
		return fmt.Errorf("breaking its lease (to %s): %w", to, err)
	}
}

// newEventFile makes a signalfd (same mask) or a timerfd (same clock, armed
// for what was left of it, with its unread expirations) inside the process.
func (b *builder) newEventFile(f *pb.FileEntry, park func(uint64) (int, error)) (int, error) {
	nonblock := uint64(0)
	if f.Flags&unix.O_NONBLOCK != 0 {
		nonblock = unix.O_NONBLOCK
	}
	if f.Type == "signalfd" {
		m, err := b.put(scratchOptVal, binary.LittleEndian.AppendUint64(nil, f.SignalfdMask))
		if err != nil {
			return 0, err
		}
		raw, err := b.sys(unix.SYS_SIGNALFD4, ^uint64(0), m, 8, unix.SFD_CLOEXEC|nonblock)
		if err != nil {
			return 0, err
		}
		return park(raw)
	}
	t := f.Timerfd
	if t == nil {
		return 0, fmt.Errorf("timerfd without its description")
	}
	raw, err := b.sys(unix.SYS_TIMERFD_CREATE, uint64(t.Clockid), unix.TFD_CLOEXEC|nonblock)
	if err != nil {
		return 0, err
	}
	fd, err := park(raw)
	if err != nil {
		return 0, err
	}
	if t.ValueNs > 0 || t.IntervalNs > 0 {
		// struct itimerspec: interval, then value; relative to now.
		its := make([]byte, 32)
		binary.LittleEndian.PutUint64(its[0:], uint64(t.IntervalNs/1e9))
		binary.LittleEndian.PutUint64(its[8:], uint64(t.IntervalNs%1e9))
		v := max(t.ValueNs, 1)
		binary.LittleEndian.PutUint64(its[16:], uint64(v/1e9))
		binary.LittleEndian.PutUint64(its[24:], uint64(v%1e9))
		a, err := b.put(scratchOptVal, its)
		if err != nil {
			return 0, err
		}
		if _, err := b.sys(unix.SYS_TIMERFD_SETTIME, uint64(fd), 0, a, 0); err != nil {
			return 0, fmt.Errorf("timerfd_settime: %w", err)
		}
	}
	if t.Ticks > 0 {
		const tfdIocSetTicks = 0x40085400
		a, err := b.put(scratchOptVal, binary.LittleEndian.AppendUint64(nil, t.Ticks))
		if err != nil {
			return 0, err
		}
		if _, err := b.sys(unix.SYS_IOCTL, uint64(fd), tfdIocSetTicks, a); err != nil {
			return 0, fmt.Errorf("%d unread expirations (TFD_IOC_SET_TICKS): %w", t.Ticks, err)
		}
	}
	return fd, nil
}

// openFifo opens a named pipe read-write inside the process (which never
// waits for a peer), sets its capacity and refills what it held; its fds
// are then opened through this helper. A FIFO whose path was unlinked is
// made again under a temporary name, removed once it is open.
func (b *builder) openFifo(f *pb.FileEntry, park func(uint64) (int, error), ghosts *[]func()) (int, error) {
	path := f.Path
	if f.FifoDeleted {
		path = fmt.Sprintf("%s.ferry-%d", f.Path, b.pid)
		fs := b.fsFor(f.Path)
		if err := fs.mkfifo(path, f.Mode&0o7777); err != nil {
			return 0, fmt.Errorf("mkfifo: %w", err)
		}
		*ghosts = append(*ghosts, fs.dropper(path))
	}
	raw, err := b.openIn(path, &pb.FileEntry{Type: "fifo", Flags: unix.O_RDWR | unix.O_NONBLOCK})
	if err != nil {
		return 0, err
	}
	fd, err := park(raw)
	if err != nil {
		return 0, err
	}
	if f.PipeSize > 0 {
		if _, err := b.sys(unix.SYS_FCNTL, uint64(fd), unix.F_SETPIPE_SZ, uint64(f.PipeSize)); err != nil {
			return 0, fmt.Errorf("capacity %d: %w", f.PipeSize, err)
		}
	}
	data := f.PipeData
	for _, o := range b.r.is.files {
		if o.Type == "fifo" && o.Ino == f.Ino && len(o.PipeData) > 0 {
			data = o.PipeData
		}
	}
	if len(data) > 0 {
		w, err := os.OpenFile(fmt.Sprintf("/proc/%d/fd/%d", b.pid, fd), os.O_WRONLY, 0)
		if err != nil {
			return 0, err
		}
		_, err = w.Write(data)
		w.Close()
		if err != nil {
			return 0, fmt.Errorf("refill: %w", err)
		}
	}
	return fd, nil
}

// newInotify makes an inotify fd with the same watches under the same
// watch descriptors. The kernel hands out descriptors one after the other,
// so a gap is filled with a watch on a scratch file, removed afterwards.
func (b *builder) newInotify(f *pb.FileEntry, park func(uint64) (int, error)) (int, error) {
	flags := uint64(unix.IN_CLOEXEC)
	if f.Flags&unix.O_NONBLOCK != 0 {
		flags |= unix.IN_NONBLOCK
	}
	raw, err := b.sys(unix.SYS_INOTIFY_INIT1, flags)
	if err != nil {
		return 0, err
	}
	fd, err := park(raw)
	if err != nil {
		return 0, err
	}
	scratch, err := os.MkdirTemp("", "ferry-inotify-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(scratch)
	add := func(path string, mask uint32) (int32, error) {
		a, err := b.putString(0, path)
		if err != nil {
			return 0, err
		}
		wd, err := b.sys(unix.SYS_INOTIFY_ADD_WATCH, uint64(fd), a, uint64(mask))
		return int32(wd), err
	}
	var fillers []int32
	next := int32(1) // a new group hands out 1, 2, ... in turn
	for _, w := range f.Inotify {
		for next < w.Wd {
			p := fmt.Sprintf("%s/%d", scratch, len(fillers))
			if err := os.WriteFile(p, nil, 0o600); err != nil {
				return 0, err
			}
			fw, err := add(p, unix.IN_ACCESS)
			if err != nil {
				return 0, fmt.Errorf("scratch watch: %w", err)
			}
			fillers = append(fillers, fw)
			next = fw + 1
		}
		path := w.Path
		if w.Deleted {
			// Removed, and open: watched through its ghost's stand-in.
			g := b.r.ghostByIno(w.Ino)
			if g == nil {
				return 0, fmt.Errorf("watch %s: the removed file is not in the images", w.Path)
			}
			if path, err = b.ghostPath(g); err != nil {
				return 0, err
			}
		}
		wd, err := add(path, w.Mask)
		if err != nil {
			return 0, fmt.Errorf("watch %s: %w", w.Path, err)
		}
		if wd != w.Wd {
			return 0, fmt.Errorf("watch %s got descriptor %d, want %d", w.Path, wd, w.Wd)
		}
		next = wd + 1
	}
	for _, fw := range fillers {
		b.sys(unix.SYS_INOTIFY_RM_WATCH, uint64(fd), uint64(fw))
	}
	if len(fillers) > 0 {
		// Removing a watch queues an IN_IGNORED event: read them away.
		dup, err := b.localFd(fd)
		if err != nil {
			return 0, err
		}
		defer unix.Close(dup)
		if n, err := unix.IoctlGetInt(dup, unix.SIOCINQ); err == nil && n > 0 {
			unix.Read(dup, make([]byte, n))
		}
	}
	return fd, nil
}

// newFanotify makes a fanotify group with the dumped flags and marks it
// as it was.
func (b *builder) newFanotify(f *pb.FileEntry, park func(uint64) (int, error)) (int, error) {
	fa := f.Fanotify
	if fa == nil {
		return 0, fmt.Errorf("fanotify group without its description")
	}
	raw, err := b.sys(unix.SYS_FANOTIFY_INIT, uint64(fa.Flags), uint64(fa.EventFlags))
	if err != nil {
		return 0, fmt.Errorf("fanotify_init(%#x, %#x): %w", fa.Flags, fa.EventFlags, err)
	}
	fd, err := park(raw)
	if err != nil {
		return 0, err
	}
	for _, m := range fa.Marks {
		a, err := b.putString(0, m.Path)
		if err != nil {
			return 0, err
		}
		flags := uint64(unix.FAN_MARK_ADD | m.Mflags)
		if m.Mount {
			flags |= unix.FAN_MARK_MOUNT
		}
		if m.Mask != 0 {
			if _, err := b.sys(unix.SYS_FANOTIFY_MARK, uint64(fd), flags, m.Mask, atFdcwd, a); err != nil {
				return 0, fmt.Errorf("mark %s (mask %#x): %w", m.Path, m.Mask, err)
			}
		}
		if m.IgnoredMask != 0 {
			if _, err := b.sys(unix.SYS_FANOTIFY_MARK, uint64(fd), flags|unix.FAN_MARK_IGNORED_MASK, m.IgnoredMask, atFdcwd, a); err != nil {
				return 0, fmt.Errorf("mark %s (ignored mask %#x): %w", m.Path, m.IgnoredMask, err)
			}
		}
	}
	return fd, nil
}

// standIn makes a directory standing in for removed directory f: at its
// old path if that is free (so that /proc shows the same name), else
// beside it. The caller removes it once it is open or entered.
//
// Parents that were removed too are made again as well, and removed with
// it: the caller removes what cleanup returns.
func standIn(fs standInFS, f *pb.FileEntry) (path string, cleanup []string, err error) {
	// Removed parents first, outermost first.
	var missing []string
	for d := filepath.Dir(f.Path); d != "/" && d != "."; d = filepath.Dir(d) {
		if fs.exists(d) {
			break
		}
		missing = append(missing, d)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := fs.mkdir(missing[i], 0o700); err != nil {
			return "", cleanup, fmt.Errorf("removed directory %s: its removed parent %s: %w", f.Path, missing[i], err)
		}
		cleanup = append([]string{missing[i]}, cleanup...)
	}
	p, err := makeBeside(f.Path, "removed directory", func(p string) error { return fs.mkdir(p, f.Mode&0o777) })
	if err != nil {
		return "", cleanup, err
	}
	return p, append([]string{p}, cleanup...), nil
}

// makeBeside makes a stand-in (what, in errors) with mk at path or,
// where something is there already, at the first free path.ferry-N.
func makeBeside(path, what string, mk func(p string) error) (string, error) {
	for i := -1; i < 100; i++ {
		p := path
		if i >= 0 {
			p = fmt.Sprintf("%s.ferry-%d", path, i)
		}
		if err := mk(p); err == nil {
			return p, nil
		} else if !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("%s %s: %w", what, path, err)
		}
	}
	return "", fmt.Errorf("%s %s: no free name beside it", what, path)
}

// addMovedEpollTarget registers, on epoll fd epfd, a file the dumped
// registration named by a number that no longer held it: through a
// duplicate of an fd that holds it, at the old number when that is free
// (taken: it is not), closed again afterwards.
func (b *builder) addMovedEpollTarget(epfd int32, t *pb.EpollTarget, taken bool) error {
	var tmp uint64
	var err error
	if !taken {
		tmp, err = b.sys(unix.SYS_DUP3, uint64(t.SourceFd), uint64(t.Tfd), unix.O_CLOEXEC)
	} else {
		tmp, err = b.sys(unix.SYS_FCNTL, uint64(t.SourceFd), unix.F_DUPFD_CLOEXEC, 0)
	}
	if err != nil {
		return fmt.Errorf("target %d (held by fd %d): %w", t.Tfd, t.SourceFd, err)
	}
	defer b.sys(unix.SYS_CLOSE, tmp)
	if err := b.epollAdd(epfd, tmp, t); err != nil {
		return fmt.Errorf("add target %d (held by fd %d): %w", t.Tfd, t.SourceFd, err)
	}
	return nil
}

// epollAdd registers fd on epoll fd epfd with t's events and data.
func (b *builder) epollAdd(epfd int32, fd uint64, t *pb.EpollTarget) error {
	// struct epoll_event is packed on x86_64: u32 events, u64 data.
	ev := make([]byte, 12)
	binary.LittleEndian.PutUint32(ev, t.Events)
	binary.LittleEndian.PutUint64(ev[4:], t.Data)
	a, err := b.put(0, ev)
	if err != nil {
		return err
	}
	_, err = b.sys(unix.SYS_EPOLL_CTL, uint64(epfd), unix.EPOLL_CTL_ADD, fd, a)
	return err
}

// remakeSymlink makes removed symbolic link f again (pointing where it
// did) and returns its path: its old one if free, else beside it.
func remakeSymlink(fs standInFS, f *pb.FileEntry) (string, error) {
	return makeBeside(f.Path, "removed symbolic link", func(p string) error { return fs.symlink(f.SymlinkTarget, p) })
}

// standInFS makes and removes the stand-ins of removed directories,
// symlinks and FIFOs: in ferry's mount namespace (hostFS), or, for one on
// a mount of the tree's own, from inside the process, in its own
// (taskFS).
type standInFS interface {
	exists(p string) bool
	mkdir(p string, mode uint32) error
	symlink(target, p string) error
	mkfifo(p string, mode uint32) error
	dropper(p string) func() // removes p (a file, or an empty directory)
}

// fsFor is the standInFS for path.
func (b *builder) fsFor(path string) standInFS {
	if images.OnOwnMount(b.r.is.inv.MntNs, path) {
		return taskFS{b}
	}
	return hostFS{}
}

type hostFS struct{}

func (hostFS) exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}
func (hostFS) mkdir(p string, mode uint32) error {
	if err := os.Mkdir(p, os.FileMode(mode)); err != nil {
		return err
	}
	return os.Chmod(p, os.FileMode(mode)) // past the umask
}
func (hostFS) symlink(target, p string) error     { return os.Symlink(target, p) }
func (hostFS) mkfifo(p string, mode uint32) error { return unix.Mkfifo(p, mode) }
func (hostFS) dropper(p string) func()            { return func() { os.Remove(p) } }

type taskFS struct{ b *builder }

// path puts p in the process's scratch memory (at off). A process born
// in the tree's user namespace first takes its root's filesystem IDs
// there (its kernel IDs are ferry's, which the namespace's filesystems
// cannot name); restoreCreds sets its own later.
func (t taskFS) path(off uint64, p string) (uint64, error) {
	if t.b.r.holder != nil {
		t.b.sys(unix.SYS_SETFSGID, 0)
		t.b.sys(unix.SYS_SETFSUID, 0)
	}
	return t.b.putString(off, p)
}

func (t taskFS) exists(p string) bool {
	a, err := t.path(0, p)
	if err != nil {
		return false
	}
	_, err = t.b.sys(unix.SYS_FACCESSAT2, atFdcwd, a, unix.F_OK, unix.AT_SYMLINK_NOFOLLOW)
	return err == nil
}
func (t taskFS) mkdir(p string, mode uint32) error {
	a, err := t.path(0, p)
	if err == nil {
		_, err = t.b.sys(unix.SYS_MKDIRAT, atFdcwd, a, uint64(mode))
	}
	if err == nil {
		_, err = t.b.sys(unix.SYS_FCHMODAT, atFdcwd, a, uint64(mode)) // past the umask
	}
	return err
}
func (t taskFS) symlink(target, p string) error {
	ta, err := t.path(0, target)
	if err != nil {
		return err
	}
	a, err := t.path(uint64(len(target))+1, p)
	if err == nil {
		_, err = t.b.sys(unix.SYS_SYMLINKAT, ta, atFdcwd, a)
	}
	return err
}
func (t taskFS) mkfifo(p string, mode uint32) error {
	a, err := t.path(0, p)
	if err == nil {
		_, err = t.b.sys(unix.SYS_MKNODAT, atFdcwd, a, uint64(unix.S_IFIFO|mode), 0)
	}
	return err
}
func (t taskFS) dropper(p string) func() {
	return func() {
		a, err := t.path(0, p)
		if err != nil {
			return
		}
		if _, err := t.b.sys(unix.SYS_UNLINKAT, atFdcwd, a, 0); errors.Is(err, unix.EISDIR) {
			t.b.sys(unix.SYS_UNLINKAT, atFdcwd, a, unix.AT_REMOVEDIR)
		}
	}
}

// makeGhostInRoot makes the stand-in of deleted file f, which was on a
// mount of the tree's own, in the tree's mount namespace: at its old path
// if that is free, else beside it, found through the root's /proc/PID/root
// with every path resolved inside it (a symlink there cannot lead out).
// It returns the file, open for ferry to fill, and its path as the tree
// sees it; r.ghostDrops removes it.
func (r *restorer) makeGhostInRoot(f *pb.FileEntry) (*os.File, string, error) {
	root, err := os.OpenFile(fmt.Sprintf("/proc/%d/root", r.rootPid), unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, "", err
	}
	defer root.Close()
	inRoot := func(name string, flags uint64) (int, error) {
		how := &unix.OpenHow{Flags: flags | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS}
		if flags&unix.O_CREAT != 0 {
			how.Mode = 0o600
		}
		return unix.Openat2(int(root.Fd()), name, how)
	}
	inner := f.Path
	var fd int
	// Made with IDs the tree's user namespace maps, if it has one (its
	// filesystems cannot own a file by an ID they cannot name).
	err = r.inUserNsFs(func() error {
		fd, err = inRoot(inner, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL)
		for i := 0; err != nil && i < 100; i++ {
			inner = filepath.Join(filepath.Dir(f.Path), fmt.Sprintf(".ferry-ghost-%d-%d", f.Id, rand.Uint32()))
			fd, err = inRoot(inner, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL)
		}
		return err
	})
	if err != nil {
		return nil, "", fmt.Errorf("deleted file %s: a stand-in in the tree's mount namespace: %w", f.Path, err)
	}
	dir, err := inRoot(filepath.Dir(inner), unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		unix.Close(fd)
		return nil, "", err
	}
	if r.ghostDrops == nil {
		r.ghostDrops = map[uint32]func(){}
	}
	r.ghostDrops[f.Id] = sync.OnceFunc(func() {
		unix.Unlinkat(dir, filepath.Base(inner), 0)
		unix.Close(dir)
	})
	r.cleanup = append(r.cleanup, r.ghostDrops[f.Id])
	return os.NewFile(uintptr(fd), fmt.Sprintf("/proc/%d/root%s", r.rootPid, inner)), inner, nil
}
