package proc

import (
	"os"
	"strconv"
	"strings"
)

// Caller is a client ferry acts for that is not root (a client of
// ferry's RPC service): it may dump only processes that are its own, and
// restore only images of processes that are, with its rights.
type Caller struct {
	Pid         int
	Uid, Gid    uint32
	Groups      []uint32
	OomScoreAdj int
}

// ReadCaller describes the client pid, whose socket credentials are uid
// and gid.
func ReadCaller(pid int, uid, gid uint32) (*Caller, error) {
	st, err := ReadStatus(pid)
	if err != nil {
		return nil, err
	}
	c := &Caller{Pid: pid, Uid: uid, Gid: gid, Groups: st.Groups}
	if b, err := os.ReadFile(Path(pid, "oom_score_adj")); err == nil {
		c.OomScoreAdj, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	return c, nil
}
