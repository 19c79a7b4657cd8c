package main

import (
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	criu "github.com/checkpoint-restore/go-criu/v7"
	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/testutil"
)

// stages records the notifications a criu RPC client gets.
type stages struct {
	criu.NoNotify
	mu   sync.Mutex
	seen []string
}

func (s *stages) add(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seen = append(s.seen, name)
	return nil
}

func (s *stages) PreDump() error              { return s.add("pre-dump") }
func (s *stages) PostDump() error             { return s.add("post-dump") }
func (s *stages) PreRestore() error           { return s.add("pre-restore") }
func (s *stages) PostRestore(int32) error     { return s.add("post-restore") }
func (s *stages) SetupNamespaces(int32) error { return s.add("setup-namespaces") }
func (s *stages) PostResume() error           { return s.add("post-resume") }
func (s *stages) PostSetupNamespaces() error  { return s.add("post-setup-namespaces") }
func (s *stages) list() string                { return strings.Join(s.seen, ",") }
func (s *stages) reset()                      { s.seen = nil }
func (s *stages) want(t *testing.T, names string) {
	t.Helper()
	if got := s.list(); got != names {
		t.Fatalf("notifications %s, want %s", got, names)
	}
	s.reset()
}

func TestSwrkGoCriu(t *testing.T) {
	// go-criu, the library runc and podman use, drives ferry as its criu
	// binary: version, features, dump and restore of a selfcheck
	// workload (with notifications), the restored root a child of the
	// client (rst_sibling), and an option ferry lacks refused by name.
	needRoot(t)
	c := criu.MakeCriu()
	c.SetCriuPath(testutil.BuildCmd(t, "ferry"))
	v, err := c.GetCriuVersion()
	if err != nil || v != criuMajor*10000+criuMinor*100 {
		t.Fatalf("version %d, %v", v, err)
	}
	f, err := c.FeatureCheck(&rpc.CriuFeatures{MemTrack: proto.Bool(true), LazyPages: proto.Bool(true)})
	if err != nil || !f.GetMemTrack() || !f.GetLazyPages() {
		t.Fatalf("features %v, %v", f, err)
	}
	w := startSelfCheck(t, "memfd.py")
	before := w.Report(t)
	dir := t.TempDir()
	img, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	opts := func() *rpc.CriuOpts {
		return &rpc.CriuOpts{ImagesDirFd: proto.Int32(int32(img.Fd())), Pid: proto.Int32(int32(w.Pid)),
			LogLevel: proto.Int32(4), LogFile: proto.String("rpc.log"), ShellJob: proto.Bool(true)}
	}
	bad := opts()
	bad.ExecCmd = []string{"true"}
	if err := c.Dump(bad, nil); err == nil || !strings.Contains(err.Error(), "exec_cmd: not supported") {
		t.Fatalf("dump with exec_cmd: %v", err)
	}
	if !testutil.PidAlive(w.Pid) {
		t.Fatal("the refused dump touched the process")
	}
	var n stages
	if err := c.Dump(opts(), &n); err != nil {
		log, _ := os.ReadFile(dir + "/rpc.log")
		t.Fatalf("dump: %v\n%s", err, log)
	}
	n.want(t, "pre-dump,post-dump")
	w.Reap(t)
	o := opts()
	o.RstSibling = proto.Bool(true)
	if err := c.Restore(o, &n); err != nil {
		log, _ := os.ReadFile(dir + "/rpc.log")
		t.Fatalf("restore: %v\n%s", err, log)
	}
	n.want(t, "pre-restore,setup-namespaces,post-setup-namespaces,post-restore,post-resume")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()
	if st, err := proc.ReadStat(w.Pid); err != nil || st.Ppid != os.Getpid() {
		t.Fatalf("the restored root's parent is %d, not the client %d (%v)", st.Ppid, os.Getpid(), err)
	}
	checkContinued(t, before, r.Report(t))
	checkSelf(t, r)
}

func TestService(t *testing.T) {
	// ferry service answers criu's RPC on its socket, one client after
	// another, and stops with its context.
	needRoot(t)
	sock := filepath.Join(t.TempDir(), "criu.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() { done <- runContext(ctx, []string{"service", "--address", sock}, io.Discard, io.Discard) }()
	defer func() {
		cancel()
		if code := <-done; code != 0 {
			t.Errorf("service exited %d", code)
		}
	}()
	waitService(t, sock)
	for _, typ := range []rpc.CriuReqType{rpc.CriuReqType_VERSION, rpc.CriuReqType_CHECK, rpc.CriuReqType_PAGE_SERVER} {
		c, err := net.Dial("unixpacket", sock)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := proto.Marshal(&rpc.CriuReq{Type: typ.Enum()})
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4096)
		n, err := c.Read(buf)
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		var resp rpc.CriuResp
		if err := proto.Unmarshal(buf[:n], &resp); err != nil {
			t.Fatal(err)
		}
		ok := typ != rpc.CriuReqType_PAGE_SERVER
		if resp.GetType() != typ || resp.GetSuccess() != ok {
			t.Fatalf("%v: %v", typ, &resp)
		}
		if typ == rpc.CriuReqType_VERSION && resp.GetVersion().GetMajorNumber() != criuMajor {
			t.Fatalf("version: %v", &resp)
		}
		if !ok && !strings.Contains(resp.GetCrErrmsg(), "not served") {
			t.Fatalf("%v: %v", typ, &resp)
		}
	}
}

// waitService waits until ferry service's socket at sock takes a
// connection (the file appears at bind, a moment before the listen).
func waitService(t *testing.T, sock string) {
	t.Helper()
	if !waitFor(5*time.Second, func() bool {
		c, err := net.Dial("unixpacket", sock)
		if err == nil {
			c.Close()
		}
		return err == nil
	}) {
		t.Fatal("no service socket")
	}
}

// TestSwrkClientGone: a lazy dump through swrk (runc checkpoint
// --lazy-pages) whose client goes away once the dump serves its pages,
// before any lazy-pages daemon comes: swrk does not keep the process
// frozen for a daemon that will never come; it resumes it and exits.
func TestSwrkClientGone(t *testing.T) {
	needRoot(t)
	w := startSelfCheck(t, "memfd.py")
	before := w.Report(t)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "client"), os.NewFile(uintptr(fds[1]), "swrk")
	defer ours.Close()
	dir := t.TempDir()
	img, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	cmd := exec.Command(testutil.BuildCmd(t, "ferry"), "swrk", "3")
	cmd.ExtraFiles = []*os.File{theirs} // fd 3
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	theirs.Close()
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()
	send := func(req *rpc.CriuReq) {
		t.Helper()
		b, err := proto.Marshal(req)
		if err == nil {
			_, err = ours.Write(b)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	port, _ := strconv.Atoi(freePort(t))
	send(&rpc.CriuReq{Type: rpc.CriuReqType_DUMP.Enum(), Opts: &rpc.CriuOpts{ImagesDirFd: proto.Int32(int32(img.Fd())),
		Pid: proto.Int32(int32(w.Pid)), ShellJob: proto.Bool(true), LogLevel: proto.Int32(4), LogFile: proto.String("dump.log"),
		LazyPages: proto.Bool(true), NotifyScripts: proto.Bool(true),
		Ps: &rpc.CriuPageServerInfo{Address: proto.String("127.0.0.1"), Port: proto.Int32(int32(port))}}})
	buf := make([]byte, 1<<16)
	for ready := false; !ready; {
		n, err := ours.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		resp := &rpc.CriuResp{}
		if err := proto.Unmarshal(buf[:n], resp); err != nil {
			t.Fatal(err)
		}
		if resp.GetType() != rpc.CriuReqType_NOTIFY {
			log, _ := os.ReadFile(filepath.Join(dir, "dump.log"))
			t.Fatalf("before the pages were served: %v\n%s", resp, log)
		}
		ready = resp.GetNotify().GetScript() == "status-ready"
		send(&rpc.CriuReq{Type: rpc.CriuReqType_NOTIFY.Enum(), NotifySuccess: proto.Bool(true)})
	}
	ours.Close() // the client is gone
	select {
	case <-exited:
	case <-time.After(20 * time.Second):
		t.Fatal("swrk waits on with the process frozen")
	}
	checkContinued(t, before, w.Report(t))
	checkSelf(t, w)
}
