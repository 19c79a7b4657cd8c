package proc

import (
	"errors"
	"os"
	"testing"
)

func TestParseSmaps(t *testing.T) {
	in := `55d4c6a00000-55d4c6a02000 r--p 00000000 fd:01 1234                       /usr/bin/cat
Size:                  8 kB
VmFlags: rd mr mw me dw sd
7ffd5e1f0000-7ffd5e211000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
7f0000000000-7f0000001000 rw-s 00000000 00:01 77                         /dev/zero (deleted)
`
	v, err := ParseSmaps("smaps", []byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(v) != 3 {
		t.Fatalf("got %d vmas", len(v))
	}
	if v[0].Name != "/usr/bin/cat" || v[0].Inode != 1234 || v[0].Perms != "r--p" || v[0].Start != 0x55d4c6a00000 {
		t.Errorf("vma 0: %+v", v[0])
	}
	if !v[1].Has("gd") || v[1].Name != "[stack]" {
		t.Errorf("vma 1: %+v", v[1])
	}
	if v[2].Name != "/dev/zero (deleted)" {
		t.Errorf("vma 2 name %q", v[2].Name)
	}
}

func TestParseSmapsBad(t *testing.T) {
	for _, in := range []string{"zz-10 rw-p 0 0 0\n", "10-5 rw-p 00000000 00:00 0\n", "VmFlags: rd\n"} {
		if _, err := ParseSmaps("smaps", []byte(in)); !errors.Is(err, ErrParse) {
			t.Errorf("%q: err %v, want ErrParse", in, err)
		}
	}
}

func TestParseStatCommWithParens(t *testing.T) {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Fatal(err)
	}
	s, err := ParseStat("stat", b)
	if err != nil {
		t.Fatal(err)
	}
	if s.Pid != os.Getpid() || s.Ppid != os.Getppid() || s.StartStack == 0 {
		t.Errorf("stat: %+v", s)
	}
	odd := []byte("42 (a) b (c)) S 1 42 42 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 1 1 1 1 2 3 4 5 6 0 0 0 0 0 0 0 17 0 0 0 0 0 0 7 8 9 10 11 12 13 0\n")
	s, err = ParseStat("stat", odd)
	if err != nil {
		t.Fatal(err)
	}
	if s.Comm != "a) b (c)" || s.State != 'S' || s.StartCode != 2 || s.StartData != 7 || s.EnvEnd != 13 {
		t.Errorf("odd stat: %+v", s)
	}
}

func TestParseLimits(t *testing.T) {
	l, err := ReadLimits(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if len(l) != 16 {
		t.Fatalf("got %d limits", len(l))
	}
	for i, x := range l {
		if x.Resource != i {
			t.Errorf("limit %d has resource %d", i, x.Resource)
		}
	}
}

func TestParseTimers(t *testing.T) {
	in := "ID: 3\nsignal: 14/00000000deadbeef\nnotify: thread/tid.77\nClockID: 1\nID: 4\nsignal: 0/0000000000000000\nnotify: none/pid.5\nClockID: 0\n"
	tm, err := ParseTimers("timers", []byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(tm) != 2 || tm[0].ID != 3 || tm[0].Signo != 14 || tm[0].SigevValue != 0xdeadbeef ||
		tm[0].Notify != "thread" || tm[0].NotifyTid != 77 || tm[0].ClockID != 1 || tm[1].Notify != "none" {
		t.Errorf("timers: %+v", tm)
	}
}

func TestStatusSelf(t *testing.T) {
	s, err := ReadStatus(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if s.Tgid != os.Getpid() || int(s.Uid[0]) != os.Getuid() {
		t.Errorf("status: %+v", s)
	}
}

func FuzzParseSmaps(f *testing.F) {
	f.Add([]byte("00400000-00401000 r-xp 00000000 fd:01 1 /bin/x\nVmFlags: rd ex\n"))
	f.Fuzz(func(t *testing.T, b []byte) { ParseSmaps("fuzz", b) })
}

func FuzzParseStat(f *testing.F) {
	b, _ := os.ReadFile("/proc/self/stat")
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) { ParseStat("fuzz", b) })
}

func TestParseEpollTargets(t *testing.T) {
	in := "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1039\ntfd:        6 events:       19 data:           5be690  pos:0 ino:40f sdev:10\ntfd:       12 events: 80000019 data: ffffffffffffffff  pos:0 ino:1 sdev:9\n"
	got, err := ParseEpollTargets("fdinfo", []byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != (EpollTarget{6, 0x19, 0x5be690}) || got[1] != (EpollTarget{12, 0x80000019, ^uint64(0)}) {
		t.Errorf("got %+v", got)
	}
}

func TestParseMountinfo(t *testing.T) {
	in := "36 35 98:0 /mnt1 /mnt\\040x rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n" +
		"40 36 0:33 / /tmp rw,nosuid - tmpfs tmpfs rw,size=1024k\n"
	ms, err := ParseMountinfo("mountinfo", []byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 2 || ms[0].Point != "/mnt x" || ms[0].Root != "/mnt1" || ms[0].Optional[0] != "master:1" ||
		ms[0].FsType != "ext3" || ms[1].Super != "rw,size=1024k" || ms[1].Parent != 36 || ms[1].Dev != "0:33" {
		t.Fatalf("%+v", ms)
	}
	if _, err := ParseMountinfo("mountinfo", []byte("1 2 3\n")); err == nil {
		t.Fatal("a short line parsed")
	}
}
