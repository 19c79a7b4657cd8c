package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/internal/testutil"
)

// rpcClientEnv makes the test binary a client of ferry service: it sends
// one request ("dump PID" or "restore") with its images directory and
// prints the response as JSON (rpcClient).
const rpcClientEnv = "FERRY_TEST_RPC_CLIENT"

// rpcClient is the test binary as a client of ferry service, run as
// another user: FERRY_TEST_RPC_CLIENT="SOCKET IMAGES-DIR dump PID [root]"
// or "SOCKET IMAGES-DIR restore".
func rpcClient() int {
	f := strings.Fields(os.Getenv(rpcClientEnv))
	dir, err := os.Open(f[1])
	if err != nil {
		fmt.Println(err)
		return 1
	}
	opts := &rpc.CriuOpts{ImagesDirFd: proto.Int32(int32(dir.Fd())), LogLevel: proto.Int32(4)}
	typ := rpc.CriuReqType_RESTORE
	opts.LogFile = proto.String("restore.log")
	if f[2] == "dump" {
		typ = rpc.CriuReqType_DUMP
		pid, _ := strconv.Atoi(f[3])
		opts.Pid, opts.LogFile = proto.Int32(int32(pid)), proto.String("dump.log")
		if len(f) > 4 {
			opts.Root = proto.String(f[4])
		}
	}
	c, err := net.Dial("unixpacket", f[0])
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer c.Close()
	b, _ := proto.Marshal(&rpc.CriuReq{Type: typ.Enum(), Opts: opts})
	if _, err := c.Write(b); err != nil {
		fmt.Println(err)
		return 1
	}
	buf := make([]byte, 1<<16)
	n, err := c.Read(buf)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	var resp rpc.CriuResp
	if err := proto.Unmarshal(buf[:n], &resp); err != nil {
		fmt.Println(err)
		return 1
	}
	out, _ := json.Marshal(map[string]any{"success": resp.GetSuccess(), "err": resp.GetCrErrmsg(), "pid": resp.GetRestore().GetPid()})
	fmt.Println(string(out))
	return 0
}

// asNobody runs the test binary as a client of the service at sock, as
// uid and gid 65534, and returns its answer.
func asNobody(t *testing.T, bin, sock, dir string, req ...string) (ok bool, errmsg string, pid int) {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = []string{rpcClientEnv + "=" + strings.Join(append([]string{sock, dir}, req...), " ")}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{65534}}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the client: %v\n%s", err, out)
	}
	var r struct {
		Success bool
		Err     string
		Pid     int
	}
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("the client says %q", out)
	}
	return r.Success, r.Err, r.Pid
}

func TestServiceCallerNotRoot(t *testing.T) {
	// ferry service with its socket open to all (--socket-mode 0666)
	// serves a client that is not root (uid 65534) for its own
	// processes: it dumps its memcheck workload into the client's
	// directory (the images the client's files) and restores it from
	// there, the same process going on as the client. A process of
	// root's, an option that would have ferry act as root (root) and a
	// directory the client does not own are refused by name, and root's
	// process runs on.
	needRoot(t)
	top, err := os.MkdirTemp("", "ferry-caller-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(top) })
	img := filepath.Join(top, "img")
	for _, d := range []string{top, img} {
		os.MkdirAll(d, 0o755)
		os.Chmod(d, 0o777)
	}
	os.Chown(img, 65534, 65534)
	// The test binary, where the client's user can run it.
	self, _ := os.ReadFile("/proc/self/exe")
	bin := filepath.Join(top, "client")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(top, "criu.sock")
	done := make(chan int, 1)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		done <- runContext(ctx, []string{"service", "--address", sock, "--socket-mode", "0666"}, io.Discard, io.Discard)
	}()
	defer func() {
		cancel()
		<-done
	}()
	waitService(t, sock)

	mem := testutil.BuildC(t, "memcheck")
	report := filepath.Join(top, "report")
	w := startAsNobody(t, mem, report)
	before := w.Report(t)

	// Root's process, and an option for root only.
	root := testutil.Start(t, "", "python3", filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", "guard.py"))
	if ok, msg, _ := asNobody(t, bin, sock, img, "dump", strconv.Itoa(root.Pid)); ok || !strings.Contains(msg, "not the caller's") {
		t.Fatalf("dump of root's process %d: ok %v, %q", root.Pid, ok, msg)
	}
	checkRunsOn(t, root)
	if ok, msg, _ := asNobody(t, bin, sock, img, "dump", strconv.Itoa(w.Pid), "/"); ok || !strings.Contains(msg, "root: not allowed") {
		t.Fatalf("dump with root: ok %v, %q", ok, msg)
	}
	// A directory the client may write in but does not own.
	if ok, msg, _ := asNobody(t, bin, sock, top, "dump", strconv.Itoa(w.Pid)); ok || !strings.Contains(msg, "not a directory of the client's") {
		t.Fatalf("dump into root's directory: ok %v, %q", ok, msg)
	}

	// A symlink the client left where the log goes, to a file of root's:
	// ferry makes the log anew and leaves root's file alone.
	victim := filepath.Join(top, "roots")
	os.WriteFile(victim, []byte("root's"), 0o600)
	os.Symlink(victim, filepath.Join(img, "dump.log"))
	if ok, msg, _ := asNobody(t, bin, sock, img, "dump", strconv.Itoa(w.Pid)); !ok {
		log, _ := os.ReadFile(filepath.Join(img, "dump.log"))
		t.Fatalf("dump: %s\n%s", msg, log)
	}
	if err := testutil.WaitGone(w.Pid, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "root's" {
		t.Fatalf("root's file was written through the client's symlink: %q", b)
	}
	ents, _ := os.ReadDir(img)
	for _, e := range ents {
		var st syscall.Stat_t
		if err := syscall.Lstat(filepath.Join(img, e.Name()), &st); err != nil || st.Uid != 65534 || st.Mode&syscall.S_IFMT != syscall.S_IFREG {
			t.Fatalf("%s in the client's directory: uid %d, mode %o (%v)", e.Name(), st.Uid, st.Mode, err)
		}
	}
	ok, msg, pid := asNobody(t, bin, sock, img, "restore")
	if !ok {
		log, _ := os.ReadFile(filepath.Join(img, "restore.log"))
		t.Fatalf("restore: %s\n%s", msg, log)
	}
	if pid != w.Pid {
		t.Fatalf("restored as %d, want %d", pid, w.Pid)
	}
	r := testutil.Attach(t, pid, report)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if !strings.Contains(string(b), "Uid:\t65534\t65534\t65534\t65534") || !strings.Contains(string(b), "CapEff:\t0000000000000000") {
		t.Fatalf("the restored process is not the client's:\n%s", b)
	}
}

// startAsNobody starts memcheck as uid 65534, reporting to report.
func startAsNobody(t *testing.T, bin, report string) *testutil.Workload {
	t.Helper()
	cmd := exec.Command(bin, "-m", "4", "-t", "2", "-r", report)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{65534}}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w := testutil.Attach(t, cmd.Process.Pid, report)
	t.Cleanup(func() { w.Kill(); cmd.Wait() })
	if !waitFor(5*time.Second, func() bool { _, err := os.Stat(report); return err == nil }) {
		t.Fatal("memcheck did not report")
	}
	return w
}
