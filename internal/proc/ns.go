package proc

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Namespace names the namespace of kind ("uts", "ipc", "net", ...) that
// pid is in, as /proc/PID/ns/KIND reads ("uts:[4026531838]").
func Namespace(pid int, kind string) (string, error) {
	return os.Readlink(Path(pid, "ns/"+kind))
}

// nsGetUserns is ioctl_ns(2)'s NS_GET_USERNS: _IO(0xb7, 0x1).
const nsGetUserns = 0xb701

// NamespaceOwner names the user namespace that owns pid's namespace of
// kind ("user:[4026531837]"): the one its creator was in.
func NamespaceOwner(pid int, kind string) (string, error) {
	name := Path(pid, "ns/"+kind)
	f, err := os.Open(name)
	if err != nil {
		return "", err
	}
	defer f.Close()
	fd, err := unix.IoctlRetInt(int(f.Fd()), nsGetUserns)
	if err != nil {
		return "", fmt.Errorf("%s: NS_GET_USERNS: %w", name, err)
	}
	defer unix.Close(fd)
	return os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
}

// IDMap is a line of /proc/PID/uid_map or gid_map: Count IDs from Inner
// (inside the namespace) are Outer (in its parent) onward.
type IDMap struct{ Inner, Outer, Count uint32 }

// ReadIDMap reads pid's uid_map or gid_map (file "uid_map", "gid_map").
func ReadIDMap(pid int, file string) ([]IDMap, error) {
	name := Path(pid, file)
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	var out []IDMap
	for _, line := range strings.Split(string(b), "\n") {
		if strings.TrimSpace(line) == "" {
			continue // none written yet, or the last newline
		}
		var m IDMap
		if _, err := fmt.Sscan(line, &m.Inner, &m.Outer, &m.Count); err != nil {
			return nil, fmt.Errorf("%s: %q: %w", name, line, err)
		}
		out = append(out, m)
	}
	return out, nil
}

// nsFlags are the setns(2) types of the namespaces InNamespace joins (not
// mnt or user: a multi-threaded process cannot join those).
var nsFlags = map[string]int{"uts": unix.CLONE_NEWUTS, "ipc": unix.CLONE_NEWIPC, "net": unix.CLONE_NEWNET, "cgroup": unix.CLONE_NEWCGROUP}

// InNamespace runs f on an OS thread of its own that has joined pid's
// namespace of kind; the thread ends with f (it is never handed back to
// the Go scheduler in that namespace).
func InNamespace(pid int, kind string, f func() error) error {
	flag, ok := nsFlags[kind]
	if !ok {
		return fmt.Errorf("joining a %s namespace: not supported", kind)
	}
	name := Path(pid, "ns/"+kind)
	nsf, err := os.Open(name)
	if err != nil {
		return err
	}
	defer nsf.Close()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		if err := unix.Setns(int(nsf.Fd()), flag); err != nil {
			done <- fmt.Errorf("setns %s: %w", name, err)
			return
		}
		done <- f()
	}()
	return <-done
}

// Mount is one line of /proc/PID/mountinfo.
type Mount struct {
	ID, Parent int
	Dev        string // "major:minor"
	Root       string // the mounted directory of its filesystem
	Point      string
	Opts       string   // per-mount options: "rw,nosuid,relatime"
	Optional   []string // "shared:N", "master:N", ...
	FsType     string
	Source     string
	Super      string // the filesystem's options
}

// ReadMountinfo reads /proc/PID/mountinfo: the mounts of pid's mount
// namespace as pid sees them, parents before children.
func ReadMountinfo(pid int) ([]Mount, error) {
	name := Path(pid, "mountinfo")
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	return ParseMountinfo(name, b)
}

// ParseMountinfo parses mountinfo contents.
func ParseMountinfo(name string, b []byte) ([]Mount, error) {
	var out []Mount
	for ln, line := range strings.Split(string(b), "\n") {
		if line == "" {
			continue
		}
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 6 || len(g) < 3 {
			return nil, fmt.Errorf("%s:%d: %q", name, ln+1, line)
		}
		id, err1 := strconv.Atoi(f[0])
		parent, err2 := strconv.Atoi(f[1])
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%s:%d: mount ids %q %q", name, ln+1, f[0], f[1])
		}
		out = append(out, Mount{ID: id, Parent: parent, Dev: f[2], Root: unescapeMount(f[3]), Point: unescapeMount(f[4]),
			Opts: f[5], Optional: f[6:], FsType: g[0], Source: unescapeMount(g[1]), Super: g[2]})
	}
	return out, nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
