package sysvipc

import "testing"

func TestParse(t *testing.T) {
	shm := `       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap
  12345678          3  1640                 65536  100   101      1     0     5     0     0 1 2 3 65536 0
         0          4  1600                  8192  100   101      1  1000  1000     0     0 1 2 3 8192 0
`
	got, err := parse("shm", "shm", []byte(shm))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != (Object{Key: 12345678, ID: 3, Mode: 0o1640, Size: 65536, Uid: 0, Gid: 5}) ||
		got[1].Mode&ShmDest == 0 || got[1].Uid != 1000 {
		t.Fatalf("shm: %+v", got)
	}
	msg := `       key      msqid perms      cbytes       qnum lspid lrpid   uid   gid  cuid  cgid      stime      rtime      ctime
        42          0   600          11          2   7     0     0     0     0     0 1 0 2
`
	got, err = parse("msg", "msg", []byte(msg))
	if err != nil || len(got) != 1 || got[0] != (Object{Key: 42, ID: 0, Mode: 0o600, Size: 11, Count: 2}) {
		t.Fatalf("msg: %+v %v", got, err)
	}
	sem := `       key      semid perms      nsems   uid   gid  cuid  cgid      otime      ctime
        -7          1   666          3     0     0     0     0          0 5
`
	got, err = parse("sem", "sem", []byte(sem))
	if err != nil || len(got) != 1 || got[0] != (Object{Key: -7, ID: 1, Mode: 0o666, Size: 3}) {
		t.Fatalf("sem: %+v %v", got, err)
	}
	if _, err := parse("shm", "shm", []byte("hdr\n1 2\n")); err == nil {
		t.Fatal("a short line parsed")
	}
}
