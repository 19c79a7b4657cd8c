package proc

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// ErrParse is wrapped by every parse error.
var ErrParse = errors.New("unexpected /proc format")

func parseErr(file string, line int, format string, a ...any) error {
	return fmt.Errorf("%s:%d: %s: %w", file, line, fmt.Sprintf(format, a...), ErrParse)
}

// Path returns /proc/PID/name.
func Path(pid int, name string) string {
	return filepath.Join("/proc", strconv.Itoa(pid), name)
}

// Tids lists the threads of pid in ascending order.
func Tids(pid int) ([]int, error) {
	ents, err := os.ReadDir(Path(pid, "task"))
	if err != nil {
		return nil, err
	}
	tids := make([]int, 0, len(ents))
	for _, e := range ents {
		t, err := strconv.Atoi(e.Name())
		if err == nil {
			tids = append(tids, t)
		}
	}
	sort.Ints(tids)
	return tids, nil
}

// Vma is one line of /proc/PID/maps plus its smaps VmFlags.
type Vma struct {
	Start, End uint64
	Perms      string // "rwxp"
	Pgoff      uint64
	Dev        string // "fd:01"
	Inode      uint64
	Name       string
	VmFlags    []string
}

// Has reports whether the VmFlags contain flag (e.g. "gd", "sh", "wr").
func (v *Vma) Has(flag string) bool {
	for _, f := range v.VmFlags {
		if f == flag {
			return true
		}
	}
	return false
}

// Size is the length in bytes.
func (v *Vma) Size() uint64 { return v.End - v.Start }

// ReadSmaps reads /proc/PID/smaps.
func ReadSmaps(pid int) ([]Vma, error) {
	name := Path(pid, "smaps")
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	return ParseSmaps(name, b)
}

// ReadMaps reads /proc/PID/maps (no VmFlags).
func ReadMaps(pid int) ([]Vma, error) {
	name := Path(pid, "maps")
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	return ParseSmaps(name, b)
}

func isMapsLine(line string) bool {
	// Header lines start with "start-end "; smaps detail lines with "Key:".
	i := strings.IndexByte(line, ' ')
	if i < 0 {
		return false
	}
	return strings.IndexByte(line[:i], '-') > 0 && !strings.HasSuffix(line[:i], ":")
}

// ParseSmaps parses maps or smaps contents.
func ParseSmaps(file string, b []byte) ([]Vma, error) {
	var out []Vma
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	ln := 0
	for sc.Scan() {
		ln++
		line := sc.Text()
		if line == "" {
			continue
		}
		if strings.HasPrefix(line, "VmFlags:") {
			if len(out) == 0 {
				return nil, parseErr(file, ln, "VmFlags before any mapping")
			}
			out[len(out)-1].VmFlags = strings.Fields(line[len("VmFlags:"):])
			continue
		}
		if !isMapsLine(line) {
			continue
		}
		v, err := parseMapsLine(line)
		if err != nil {
			return nil, parseErr(file, ln, "%v", err)
		}
		out = append(out, v)
	}
	return out, sc.Err()
}

func parseMapsLine(line string) (Vma, error) {
	var v Vma
	// start-end perms offset dev inode [name]
	f := strings.SplitN(line, " ", 6)
	if len(f) < 5 {
		return v, fmt.Errorf("short maps line %q", line)
	}
	se := strings.SplitN(f[0], "-", 2)
	if len(se) != 2 {
		return v, fmt.Errorf("bad range %q", f[0])
	}
	var err error
	if v.Start, err = strconv.ParseUint(se[0], 16, 64); err != nil {
		return v, err
	}
	if v.End, err = strconv.ParseUint(se[1], 16, 64); err != nil {
		return v, err
	}
	if v.End <= v.Start || len(f[1]) != 4 {
		return v, fmt.Errorf("bad mapping %q", line)
	}
	v.Perms = f[1]
	if v.Pgoff, err = strconv.ParseUint(f[2], 16, 64); err != nil {
		return v, err
	}
	v.Dev = f[3]
	if v.Inode, err = strconv.ParseUint(f[4], 10, 64); err != nil {
		return v, err
	}
	if len(f) == 6 {
		v.Name = strings.TrimLeft(f[5], " ")
	}
	return v, nil
}

// Stat holds the /proc/PID/stat fields ferry uses.
type Stat struct {
	Pid, Ppid, Pgid, Sid int
	TtyNr                uint64 // controlling terminal (device number), 0 if none
	Tpgid                int    // its foreground process group
	Comm                 string
	State                byte
	Flags                uint64
	Nice                 int    // also of a real-time task (sched_getattr says 0 for one)
	StartTime            uint64 // clock ticks after boot: with the PID, names the process
	ExitSignal           int
	StartCode, EndCode   uint64
	StartStack           uint64
	StartData, EndData   uint64
	StartBrk             uint64
	ArgStart, ArgEnd     uint64
	EnvStart, EnvEnd     uint64
	ExitCode             int // a zombie's wait status
}

// ReadStat reads /proc/PID/stat (or /proc/PID/task/TID/stat for name).
func ReadStat(pid int) (Stat, error) {
	name := Path(pid, "stat")
	b, err := os.ReadFile(name)
	if err != nil {
		return Stat{}, err
	}
	return ParseStat(name, b)
}

// ParseStat parses stat contents. comm may contain spaces and parentheses:
// it spans from the first '(' to the last ')'.
func ParseStat(file string, b []byte) (Stat, error) {
	var s Stat
	l := bytes.IndexByte(b, '(')
	r := bytes.LastIndexByte(b, ')')
	if l < 0 || r < l {
		return s, parseErr(file, 1, "no comm")
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b[:l])))
	if err != nil {
		return s, parseErr(file, 1, "pid: %v", err)
	}
	s.Pid = pid
	s.Comm = string(b[l+1 : r])
	f := strings.Fields(string(b[r+1:]))
	// f[0] is field 3 (state).
	if len(f) < 50 {
		return s, parseErr(file, 1, "only %d fields", len(f)+2)
	}
	s.State = f[0][0]
	num := func(field int) uint64 { // field numbers as in proc(5)
		v, e := strconv.ParseUint(f[field-3], 10, 64)
		if e != nil && err == nil {
			err = parseErr(file, 1, "field %d %q: %v", field, f[field-3], e)
		}
		return v
	}
	snum := func(field int) int {
		v, e := strconv.ParseInt(f[field-3], 10, 64)
		if e != nil && err == nil {
			err = parseErr(file, 1, "field %d %q: %v", field, f[field-3], e)
		}
		return int(v)
	}
	s.Ppid = snum(4)
	s.Pgid = snum(5)
	s.Sid = snum(6)
	s.TtyNr = num(7)
	s.Tpgid = snum(8)
	s.Flags = num(9)
	s.Nice = snum(19)
	s.StartTime = num(22)
	s.StartCode = num(26)
	s.EndCode = num(27)
	s.StartStack = num(28)
	s.ExitSignal = snum(38)
	s.StartData = num(45)
	s.EndData = num(46)
	s.StartBrk = num(47)
	s.ArgStart = num(48)
	s.ArgEnd = num(49)
	s.EnvStart = num(50)
	s.EnvEnd = num(51)
	s.ExitCode = snum(52)
	return s, err
}

// Status holds the /proc/PID/status fields ferry uses.
type Status struct {
	Umask                  uint32
	Uid, Gid               [4]uint32 // real, effective, saved, fs
	Groups                 []uint32
	CapInh, CapPrm, CapEff uint64
	CapBnd, CapAmb         uint64
	NoNewPrivs             bool
	Seccomp                int
	SigBlk, SigIgn, SigCgt uint64
	ShdPnd, SigPnd         uint64
	State                  byte
	Tgid                   int
	// NSpid, NSpgid, NSsid: the task's PID, group and session in each
	// PID namespace it is in, from the one of this /proc to its own.
	NSpid, NSpgid, NSsid []int
}

// ReadStatus reads /proc/PID/status.
func ReadStatus(pid int) (Status, error) {
	name := Path(pid, "status")
	b, err := os.ReadFile(name)
	if err != nil {
		return Status{}, err
	}
	return ParseStatus(name, b)
}

// ReadThreadStatus reads the status of thread tid of process pid (the
// process's own for its main thread).
func ReadThreadStatus(pid, tid int) (Status, error) {
	name := Path(pid, "status")
	if tid != pid {
		name = Path(pid, "task/"+strconv.Itoa(tid)+"/status")
	}
	b, err := os.ReadFile(name)
	if err != nil {
		return Status{}, err
	}
	return ParseStatus(name, b)
}

// ParseStatus parses status contents.
func ParseStatus(file string, b []byte) (Status, error) {
	var s Status
	sc := bufio.NewScanner(bytes.NewReader(b))
	ln := 0
	for sc.Scan() {
		ln++
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		var err error
		hex := func() uint64 {
			x, e := strconv.ParseUint(v, 16, 64)
			if e != nil {
				err = e
			}
			return x
		}
		ids := func(dst *[4]uint32) {
			f := strings.Fields(v)
			if len(f) != 4 {
				err = fmt.Errorf("want 4 ids, got %q", v)
				return
			}
			for i := range f {
				x, e := strconv.ParseUint(f[i], 10, 32)
				if e != nil {
					err = e
				}
				dst[i] = uint32(x)
			}
		}
		switch k {
		case "Umask":
			x, e := strconv.ParseUint(v, 8, 32)
			s.Umask, err = uint32(x), e
		case "State":
			if v != "" {
				s.State = v[0]
			}
		case "Tgid":
			s.Tgid, err = strconv.Atoi(v)
		case "NSpid", "NSpgid", "NSsid":
			var ids []int
			for _, f := range strings.Fields(v) {
				x, e := strconv.Atoi(f)
				if e != nil {
					err = e
				}
				ids = append(ids, x)
			}
			switch k {
			case "NSpid":
				s.NSpid = ids
			case "NSpgid":
				s.NSpgid = ids
			default:
				s.NSsid = ids
			}
		case "Uid":
			ids(&s.Uid)
		case "Gid":
			ids(&s.Gid)
		case "Groups":
			for _, g := range strings.Fields(v) {
				x, e := strconv.ParseUint(g, 10, 32)
				if e != nil {
					err = e
				}
				s.Groups = append(s.Groups, uint32(x))
			}
		case "CapInh":
			s.CapInh = hex()
		case "CapPrm":
			s.CapPrm = hex()
		case "CapEff":
			s.CapEff = hex()
		case "CapBnd":
			s.CapBnd = hex()
		case "CapAmb":
			s.CapAmb = hex()
		case "NoNewPrivs":
			s.NoNewPrivs = v == "1"
		case "Seccomp":
			s.Seccomp, err = strconv.Atoi(v)
		case "SigBlk":
			s.SigBlk = hex()
		case "SigIgn":
			s.SigIgn = hex()
		case "SigCgt":
			s.SigCgt = hex()
		case "ShdPnd":
			s.ShdPnd = hex()
		case "SigPnd":
			s.SigPnd = hex()
		}
		if err != nil {
			return s, parseErr(file, ln, "%s: %v", k, err)
		}
	}
	return s, sc.Err()
}

// Rlimit is one resource limit; Infinity is ^uint64(0).
type Rlimit struct {
	Resource int
	Cur, Max uint64
}

// Infinity is RLIM_INFINITY.
const Infinity = ^uint64(0)

// limitNames are the rows of /proc/PID/limits in resource order
// (fs/proc/base.c lnames[]).
var limitNames = []string{
	"Max cpu time", "Max file size", "Max data size", "Max stack size",
	"Max core file size", "Max resident set", "Max processes", "Max open files",
	"Max locked memory", "Max address space", "Max file locks", "Max pending signals",
	"Max msgqueue size", "Max nice priority", "Max realtime priority", "Max realtime timeout",
}

// ReadLimits reads /proc/PID/limits. ferry reads limits here rather than with
// prlimit(2), which needs CAP_SYS_RESOURCE for another user's task.
func ReadLimits(pid int) ([]Rlimit, error) {
	name := Path(pid, "limits")
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	return ParseLimits(name, b)
}

// ParseLimits parses limits contents.
func ParseLimits(file string, b []byte) ([]Rlimit, error) {
	var out []Rlimit
	lines := strings.Split(string(b), "\n")
	for ln, line := range lines {
		if ln == 0 || strings.TrimSpace(line) == "" {
			continue
		}
		res := -1
		for i, n := range limitNames {
			if strings.HasPrefix(line, n+" ") {
				res = i
				line = line[len(n):]
				break
			}
		}
		if res < 0 {
			return nil, parseErr(file, ln+1, "unknown limit %q", line)
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			return nil, parseErr(file, ln+1, "short line")
		}
		val := func(s string) (uint64, error) {
			if s == "unlimited" {
				return Infinity, nil
			}
			return strconv.ParseUint(s, 10, 64)
		}
		cur, err := val(f[0])
		if err != nil {
			return nil, parseErr(file, ln+1, "%v", err)
		}
		max, err := val(f[1])
		if err != nil {
			return nil, parseErr(file, ln+1, "%v", err)
		}
		out = append(out, Rlimit{Resource: res, Cur: cur, Max: max})
	}
	return out, nil
}

// FdInfo is /proc/PID/fdinfo/N.
type FdInfo struct {
	Pos   int64
	Flags uint32 // octal in the file
	MntID int
	Ino   uint64
	Extra map[string]string
	Locks []string // "lock:" lines: "N: POSIX  ADVISORY  WRITE PID DEV:INO START END"
	// Inotify holds the "inotify wd:N ino:... sdev:... mask:... f_handle:..."
	// lines of an inotify fd, without the leading "inotify ".
	Inotify []string
	// Fanotify holds the "fanotify ..." lines of a fanotify fd (the
	// group's flags, then one per mark), without the leading "fanotify ".
	Fanotify []string
}

// ReadFdInfo reads /proc/PID/fdinfo/FD.
func ReadFdInfo(pid, fd int) (FdInfo, error) {
	name := Path(pid, "fdinfo/"+strconv.Itoa(fd))
	b, err := os.ReadFile(name)
	if err != nil {
		return FdInfo{}, err
	}
	return ParseFdInfo(name, b)
}

// ParseFdInfo parses fdinfo contents.
func ParseFdInfo(file string, b []byte) (FdInfo, error) {
	fi := FdInfo{Extra: map[string]string{}}
	for ln, line := range strings.Split(string(b), "\n") {
		if w, ok := strings.CutPrefix(line, "inotify "); ok {
			fi.Inotify = append(fi.Inotify, w)
			continue
		}
		if w, ok := strings.CutPrefix(line, "fanotify "); ok {
			fi.Fanotify = append(fi.Fanotify, w)
			continue
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		var err error
		switch k {
		case "pos":
			fi.Pos, err = strconv.ParseInt(v, 10, 64)
		case "flags":
			var x uint64
			x, err = strconv.ParseUint(v, 8, 32)
			fi.Flags = uint32(x)
		case "mnt_id":
			fi.MntID, err = strconv.Atoi(v)
		case "ino":
			fi.Ino, err = strconv.ParseUint(v, 10, 64)
		case "lock":
			fi.Locks = append(fi.Locks, v)
		default:
			fi.Extra[k] = v
		}
		if err != nil {
			return fi, parseErr(file, ln+1, "%s: %v", k, err)
		}
	}
	return fi, nil
}

// ReadAuxv reads /proc/PID/auxv as machine words, up to and including AT_NULL.
func ReadAuxv(pid int) ([]uint64, error) {
	b, err := os.ReadFile(Path(pid, "auxv"))
	if err != nil {
		return nil, err
	}
	var out []uint64
	for i := 0; i+16 <= len(b); i += 16 {
		k := binary.LittleEndian.Uint64(b[i:])
		v := binary.LittleEndian.Uint64(b[i+8:])
		out = append(out, k, v)
		if k == 0 {
			break
		}
	}
	return out, nil
}

// PosixTimer is one entry of /proc/PID/timers.
type PosixTimer struct {
	ID         int
	Signo      int
	SigevValue uint64
	Notify     string // "signal", "thread", "none"
	NotifyTid  int
	// ToThread: the signal goes to thread NotifyTid ("notify: .../tid.N",
	// SIGEV_THREAD_ID), not to the process ("/pid.N").
	ToThread bool
	ClockID  int
}

// ReadTimers reads /proc/PID/timers.
func ReadTimers(pid int) ([]PosixTimer, error) {
	name := Path(pid, "timers")
	b, err := os.ReadFile(name)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	return ParseTimers(name, b)
}

// ParseTimers parses timers contents:
//
//	ID: 0
//	signal: 14/0000000000000000
//	notify: signal/pid.1234
//	ClockID: 1
func ParseTimers(file string, b []byte) ([]PosixTimer, error) {
	var out []PosixTimer
	for ln, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		var err error
		if k == "ID" {
			var id int
			id, err = strconv.Atoi(v)
			out = append(out, PosixTimer{ID: id})
		} else if len(out) == 0 {
			return nil, parseErr(file, ln+1, "%s before ID", k)
		} else {
			t := &out[len(out)-1]
			switch k {
			case "signal":
				s, val, _ := strings.Cut(v, "/")
				if t.Signo, err = strconv.Atoi(s); err == nil {
					t.SigevValue, err = strconv.ParseUint(val, 16, 64)
				}
			case "notify":
				how, who, _ := strings.Cut(v, "/")
				t.Notify = how
				t.ToThread = strings.HasPrefix(who, "tid.")
				if _, n, ok := strings.Cut(who, "."); ok {
					t.NotifyTid, err = strconv.Atoi(n)
				}
			case "ClockID":
				t.ClockID, err = strconv.Atoi(v)
			}
		}
		if err != nil {
			return nil, parseErr(file, ln+1, "%s: %v", k, err)
		}
	}
	return out, nil
}

// EpollTarget is one "tfd:" line of an epoll fd's fdinfo.
type EpollTarget struct {
	Tfd    int
	Events uint32
	Data   uint64
}

// ParseEpollTargets parses the registrations of an epoll fdinfo:
//
//	tfd:        6 events:       19 data:           5be690  pos:0 ino:40f sdev:10
func ParseEpollTargets(file string, b []byte) ([]EpollTarget, error) {
	var out []EpollTarget
	for ln, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, "tfd:") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 6 || f[2] != "events:" || f[4] != "data:" {
			return nil, parseErr(file, ln+1, "bad epoll line %q", line)
		}
		tfd, err1 := strconv.Atoi(f[1])
		ev, err2 := strconv.ParseUint(f[3], 16, 32)
		data, err3 := strconv.ParseUint(f[5], 16, 64)
		if err := errors.Join(err1, err2, err3); err != nil {
			return nil, parseErr(file, ln+1, "%v", err)
		}
		out = append(out, EpollTarget{Tfd: tfd, Events: uint32(ev), Data: data})
	}
	return out, nil
}

// IsSpecialMapping reports the kernel's special mappings: [vdso], [vvar],
// [vvar_vclock] and [vsyscall].
func IsSpecialMapping(name string) bool {
	switch name {
	case "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]":
		return true
	}
	return false
}

// WaitState polls until pid's /proc state is one of states or timeout
// passes; it reports whether it got there.
func WaitState(pid int, states string, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for {
		if st, err := ReadStat(pid); err == nil && strings.IndexByte(states, st.State) >= 0 {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// Children lists the child processes of every thread of pid
// (/proc/PID/task/TID/children); none if pid is gone.
func Children(pid int) []int {
	var out []int
	tids, _ := Tids(pid)
	for _, tid := range tids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, tid))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(f); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}
