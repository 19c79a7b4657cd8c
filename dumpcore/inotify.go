package dumpcore

import (
	"bufio"
	"encoding/hex"
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
		if err != nil {
			return fmt.Errorf("inotify watch %d: %w", wd, err)
		}
		e.Inotify = append(e.Inotify, &pb.InotifyWatch{Wd: int32(wd), Mask: uint32(mask), Path: path})
	}
	sort.Slice(e.Inotify, func(i, j int) bool { return e.Inotify[i].Wd < e.Inotify[j].Wd })
	return nil
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
		return "", fmt.Errorf("the watched file %s: %w", path, ErrUnsupported)
	}
	return path, nil
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
