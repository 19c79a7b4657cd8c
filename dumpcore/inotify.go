package dumpcore

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
)

// dumpInotify records the watches of an inotify fd. fdinfo names each
// watched inode by a file handle; ferry opens it (open_by_handle_at, on
// a mount of the same device) to learn its path. Events queued and not
// read yet are not kept.
func dumpInotify(e *pb.FileEntry, pid int, info proc.FdInfo) error {
	e.Type = "inotify"
	for _, line := range info.Inotify {
		kv := map[string]string{}
		for _, f := range strings.Fields(line) {
			if k, v, ok := strings.Cut(f, ":"); ok {
				kv[k] = v
			}
		}
		wd, err1 := strconv.Atoi(kv["wd"])
		mask, err2 := strconv.ParseUint(kv["mask"], 16, 32)
		sdev, err3 := strconv.ParseUint(kv["sdev"], 16, 64)
		htype, err4 := strconv.Atoi(kv["fhandle-type"])
		handle, err5 := hex.DecodeString(kv["f_handle"])
		for _, err := range []error{err1, err2, err3, err4, err5} {
			if err != nil {
				return fmt.Errorf("inotify watch %q: %w", line, err)
			}
		}
		path, err := handlePath(pid, sdev, int32(htype), handle)
		w := &pb.InotifyWatch{Wd: int32(wd), Mask: uint32(mask), Path: path}
		var removed *removedError
		if errors.As(err, &removed) {
			// Watched, and removed since: it must be open too, a ghost
			// of the dump (checkRemovedWatches).
			ino, perr := strconv.ParseUint(kv["ino"], 16, 64)
			if perr != nil {
				return fmt.Errorf("inotify watch %q: %w", line, perr)
			}
			w.Path, w.Deleted, w.Ino, err = removed.path, true, ino, nil
		}
		if err != nil {
			return fmt.Errorf("inotify watch %d: %w", wd, err)
		}
		e.Inotify = append(e.Inotify, w)
	}
	sort.Slice(e.Inotify, func(i, j int) bool { return e.Inotify[i].Wd < e.Inotify[j].Wd })
	return nil
}

// dumpFanotify records a fanotify group: "flags:%x event-flags:%x", then
// a line per mark, an inode's ("ino:... sdev:... mflags:%x mask:%x
// ignored_mask:%x fhandle-bytes:... fhandle-type:%x f_handle:...", found
// by its file handle as for inotify) or a mount's ("mnt_id:%x mflags:...
// mask:... ignored_mask:..."). Events queued are not kept.
func dumpFanotify(e *pb.FileEntry, pid int, info proc.FdInfo) error {
	e.Type = "fanotify"
	e.Fanotify = &pb.Fanotify{}
	hex32 := func(kv map[string]string, k string) (uint64, error) {
		return strconv.ParseUint(kv[k], 16, 64)
	}
	for i, line := range info.Fanotify {
		kv := map[string]string{}
		for _, f := range strings.Fields(line) {
			if k, v, ok := strings.Cut(f, ":"); ok {
				kv[k] = v
			}
		}
		if i == 0 {
			fl, err1 := hex32(kv, "flags")
			ef, err2 := hex32(kv, "event-flags")
			if err := errors.Join(err1, err2); err != nil {
				return fmt.Errorf("fanotify group %q: %w", line, err)
			}
			e.Fanotify.Flags, e.Fanotify.EventFlags = uint32(fl), uint32(ef)
			continue
		}
		mflags, err1 := hex32(kv, "mflags")
		mask, err2 := hex32(kv, "mask")
		ign, err3 := hex32(kv, "ignored_mask")
		if err := errors.Join(err1, err2, err3); err != nil {
			return fmt.Errorf("fanotify mark %q: %w", line, err)
		}
		m := &pb.FanotifyMark{Mflags: uint32(mflags), Mask: mask, IgnoredMask: ign}
		switch {
		case kv["mnt_id"] != "":
			id, err := strconv.ParseUint(kv["mnt_id"], 16, 32)
			if err != nil {
				return fmt.Errorf("fanotify mark %q: %w", line, err)
			}
			if m.Path, err = mountPoint(pid, int(id)); err != nil {
				return fmt.Errorf("fanotify mount mark: %w", err)
			}
			m.Mount = true
		case kv["ino"] != "":
			sdev, err1 := hex32(kv, "sdev")
			htype, err2 := hex32(kv, "fhandle-type")
			handle, err3 := hex.DecodeString(kv["f_handle"])
			if err := errors.Join(err1, err2, err3); err != nil {
				return fmt.Errorf("fanotify mark %q: %w", line, err)
			}
			path, err := handlePath(pid, sdev, int32(htype), handle)
			if err != nil {
				return fmt.Errorf("fanotify mark: %w", err)
			}
			m.Path = path
		default:
			return fmt.Errorf("fanotify mark %q: %w", line, ErrUnsupported)
		}
		e.Fanotify.Marks = append(e.Fanotify.Marks, m)
	}
	return nil
}

// mountPoint returns the mount point of mount id in pid's mount table.
func mountPoint(pid, id int) (string, error) {
	b, err := os.ReadFile(proc.Path(pid, "mountinfo"))
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		fs := strings.Fields(line)
		if len(fs) >= 5 && fs[0] == strconv.Itoa(id) {
			return fs[4], nil
		}
	}
	return "", fmt.Errorf("no mount %d", id)
}

// handlePath opens a file handle on the device sdev (the kernel's encoding:
// major << 20 | minor) through a mount of it in pid's mount table, and
// returns the path the kernel gives the result.
func handlePath(pid int, sdev uint64, htype int32, handle []byte) (string, error) {
	major, minor := sdev>>20, sdev&0xfffff
	mnt, err := mountOf(pid, fmt.Sprintf("%d:%d", major, minor))
	if err != nil {
		return "", err
	}
	m, err := os.OpenFile(proc.Path(pid, "root")+mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return "", err
	}
	defer m.Close()
	fd, err := unix.OpenByHandleAt(int(m.Fd()), unix.NewFileHandle(htype, handle), unix.O_PATH)
	if err != nil {
		return "", os.NewSyscallError("open_by_handle_at", err)
	}
	defer unix.Close(fd)
	path, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return "", err
	}
	if strings.HasSuffix(path, deletedSuffix) {
		return "", &removedError{strings.TrimSuffix(path, deletedSuffix)}
	}
	return path, nil
}

// removedError: the file a handle names was removed.
type removedError struct{ path string }

func (e *removedError) Error() string {
	return fmt.Sprintf("the watched file %s (deleted): %v", e.path, ErrUnsupported)
}

func (e *removedError) Unwrap() error { return ErrUnsupported }

// checkRemovedWatches refuses an inotify watch on a removed file that no
// fd of the dump keeps open (nothing would stand in for it).
func (ft *fileTable) checkRemovedWatches() error {
	ghosts := map[uint64]bool{}
	for _, f := range ft.entries {
		if f.Ghost {
			ghosts[f.Ino] = true
		}
	}
	for _, f := range ft.entries {
		for _, w := range f.Inotify {
			if w.Deleted && !ghosts[w.Ino] {
				return fmt.Errorf("inotify watch %d: the watched file %s was removed and is open nowhere in the dump: %w", w.Wd, w.Path, ErrUnsupported)
			}
		}
	}
	return nil
}

// mountOf returns a mount point of device dev ("major:minor") in pid's
// mount table.
func mountOf(pid int, dev string) (string, error) {
	f, err := os.Open(proc.Path(pid, "mountinfo"))
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT ...
		fs := strings.Fields(sc.Text())
		if len(fs) >= 5 && fs[2] == dev {
			return fs[4], nil
		}
	}
	return "", fmt.Errorf("no mount of device %s", dev)
}
