package proc

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Caller is a client ferry acts for that is not root (a client of
// ferry's RPC service): it may dump only processes that are its own, and
// restore only images of processes that are, with its rights, in its
// context (cgroups, limits, login and OOM settings).
type Caller struct {
	Pid         int
	Uid, Gid    uint32
	Groups      []uint32
	OomScoreAdj int
	Loginuid    uint32
	NoNewPrivs  bool
	Limits      []Rlimit
	// Cgroups is the caller's /proc/PID/cgroup.
	Cgroups []byte
}

// ReadCaller describes the client behind pidfd (its process pid), whose
// socket credentials are uid, gid and groups. What is read from /proc is
// the process's only if the pidfd still names a live process after (its
// PID was not reused meanwhile). A client under seccomp, or in other
// namespaces than ferry's, is refused: a restore for it would escape them.
func ReadCaller(pidfd, pid int, uid, gid uint32, groups []uint32) (*Caller, error) {
	c := &Caller{Pid: pid, Uid: uid, Gid: gid, Groups: groups}
	st, err := ReadStatus(pid)
	if err != nil {
		return nil, err
	}
	if st.Seccomp != 0 {
		return nil, fmt.Errorf("the client %d is under seccomp, which a restore for it would not keep", pid)
	}
	c.NoNewPrivs = st.NoNewPrivs
	for _, kind := range []string{"user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time"} {
		mine, err := os.Readlink("/proc/self/ns/" + kind)
		if err != nil {
			continue // a kernel without it
		}
		if theirs, err := Namespace(pid, kind); err != nil || theirs != mine {
			return nil, fmt.Errorf("the client %d is in another %s namespace (%s) than ferry's: serve it from a ferry of its own", pid, kind, theirs)
		}
	}
	if b, err := os.ReadFile(Path(pid, "attr/current")); err == nil {
		if l := strings.TrimSpace(strings.TrimRight(string(b), "\x00")); l != "" && l != "unconfined" {
			return nil, fmt.Errorf("the client %d is confined (%s), which a restore for it would not keep", pid, l)
		}
	}
	b, err := os.ReadFile(Path(pid, "oom_score_adj"))
	if err != nil {
		return nil, err
	}
	c.OomScoreAdj, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	if b, err = os.ReadFile(Path(pid, "loginuid")); err != nil {
		return nil, err
	}
	v, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 32)
	c.Loginuid = uint32(v)
	if c.Limits, err = ReadLimits(pid); err != nil {
		return nil, err
	}
	if c.Cgroups, err = os.ReadFile(Path(pid, "cgroup")); err != nil {
		return nil, err
	}
	// Still the client?
	if err := unix.PidfdSendSignal(pidfd, 0, nil, 0); err != nil {
		return nil, fmt.Errorf("the client %d: %w", pid, err)
	}
	return c, nil
}
