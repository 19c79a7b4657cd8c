package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/testutil"
)

// runcBundle checks that runc is there, builds ferry (runc's --criu)
// and makes an OCI bundle in a new directory: a busybox root filesystem
// whose shell draws a token, keeps it only in memory, and writes
// "TOKEN COUNT" to /out/state ten times a second (/out bound from
// outDir, another new directory). edit, when given, changes the spec
// before it is written.
func runcBundle(t *testing.T, edit ...func(spec map[string]any)) (ferryBin, dir, outDir string) {
	t.Helper()
	if _, err := exec.LookPath("runc"); err != nil {
		t.Fatalf("runc (Debian's, installed by make deps): %v", err)
	}
	ferryBin = testutil.BuildCmd(t, "ferry")
	dir, outDir = t.TempDir(), t.TempDir()
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatalf("busybox (Debian's busybox-static, installed by make deps): %v", err)
	}
	bin := filepath.Join(dir, "rootfs", "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if b, err := exec.Command("cp", bb, filepath.Join(bin, "busybox")).CombinedOutput(); err != nil {
		t.Fatalf("cp busybox: %v\n%s", err, b)
	}
	for _, c := range []string{"sh", "sleep", "echo"} {
		if err := os.Symlink("busybox", filepath.Join(bin, c)); err != nil {
			t.Fatal(err)
		}
	}
	os.MkdirAll(filepath.Join(dir, "rootfs", "out"), 0o755)
	cmd := exec.Command("runc", "spec")
	cmd.Dir = dir
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("runc spec: %v\n%s", err, b)
	}
	var spec map[string]any
	b, _ := os.ReadFile(filepath.Join(dir, "config.json"))
	if err := json.Unmarshal(b, &spec); err != nil {
		t.Fatal(err)
	}
	p := spec["process"].(map[string]any)
	p["terminal"] = false
	p["args"] = []string{"sh", "-c", `t=$$$RANDOM$RANDOM; i=0; while :; do i=$((i+1)); echo "$t $i" > /out/state; sleep 0.1; done`}
	spec["root"].(map[string]any)["readonly"] = false
	spec["mounts"] = append(spec["mounts"].([]any), map[string]any{"destination": "/out", "type": "bind", "source": outDir, "options": []string{"rbind", "rw"}})
	for _, e := range edit {
		e(spec)
	}
	b, _ = json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return ferryBin, dir, outDir
}

// runcState reads the container's "TOKEN COUNT" line.
func runcState(t *testing.T, outDir string) (string, int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		b, _ := os.ReadFile(filepath.Join(outDir, "state"))
		if f := strings.Fields(string(b)); len(f) == 2 {
			n, err := strconv.Atoi(f[1])
			if err == nil {
				return f[0], n
			}
		}
	}
	t.Fatal("the container writes no state")
	return "", 0
}

// stoppedState reads the count a checkpointed or frozen container left.
// The freeze may have caught its shell between truncating the file and
// writing it: then the count is not known, and at least n1.
func stoppedState(outDir string, n1 int) int {
	b, _ := os.ReadFile(filepath.Join(outDir, "state"))
	if f := strings.Fields(string(b)); len(f) == 2 {
		if n, err := strconv.Atoi(f[1]); err == nil {
			return n
		}
	}
	return n1
}

// runc runs runc in the bundle with stdio on pipes (as container engines
// give it; files outside the container's root cannot be restored), which
// stay open until the test ends.
func runc(t *testing.T, bundle string, args ...string) {
	t.Helper()
	cmd := exec.Command("runc", args...)
	cmd.Dir = bundle
	var ours []*os.File
	inR, inW, _ := os.Pipe()
	outR, outW, _ := os.Pipe()
	errR, errW, _ := os.Pipe()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, errW
	ours = append(ours, inW, outR, errR)
	t.Cleanup(func() {
		for _, f := range ours {
			f.Close()
		}
	})
	err := cmd.Run()
	inR.Close()
	outW.Close()
	errW.Close()
	if err != nil {
		msg := make([]byte, 4096)
		errR.SetReadDeadline(time.Now().Add(time.Second))
		n, _ := errR.Read(msg)
		// ferry's own log, named in runc's message, says why.
		var log []byte
		if i := bytes.Index(msg[:n], []byte("log file: ")); i >= 0 {
			name, _, _ := strings.Cut(string(msg[i+len("log file: "):n]), "\"")
			log, _ = os.ReadFile(strings.TrimSpace(name))
		}
		t.Fatalf("runc %s: %v\n%s\n%s", strings.Join(args, " "), err, msg[:n], log)
	}
}

func TestRuncCheckpointRestore(t *testing.T) {
	// runc, with ferry as its criu binary (--criu), pre-dumps and then
	// checkpoints a running container (PID, mount, network, IPC and UTS
	// namespaces, cgroups, a bind mount from the host, stdio on pipes)
	// and restores it: the same
	// process goes on (its token, drawn once and kept only in memory, and
	// its counter continue) in the restored container.
	needRoot(t)
	ferryBin, bundle, out := runcBundle(t)
	base := t.TempDir()
	pre, img := filepath.Join(base, "pre"), filepath.Join(base, "ck")
	os.Mkdir(pre, 0o755)
	os.Mkdir(img, 0o755)
	id := fmt.Sprintf("ferry-test-%d", os.Getpid())
	t.Cleanup(func() { exec.Command("runc", "delete", "-f", id).Run() })
	runc(t, bundle, "run", "-d", id)
	token, n1 := runcState(t, out)
	// A pre-dump round first (the container runs on), then the
	// checkpoint on top of it: only what was written since is copied.
	runc(t, bundle, "--criu", ferryBin, "checkpoint", "--pre-dump", "--image-path", pre, "--work-path", pre, id)
	runc(t, bundle, "--criu", ferryBin, "checkpoint", "--parent-path", "../pre", "--image-path", img, "--work-path", img, id)
	if log, _ := os.ReadFile(filepath.Join(img, "dump.log")); !strings.Contains(string(log), "incremental round") {
		t.Fatalf("the checkpoint did not build on the pre-dump:\n%s", log)
	}
	if b, err := exec.Command("runc", "state", id).CombinedOutput(); err == nil {
		t.Fatalf("the container is still there after the checkpoint:\n%s", b)
	}
	n2 := stoppedState(out, n1)
	runc(t, bundle, "--criu", ferryBin, "restore", "-d", "--image-path", img, "--work-path", img, id)
	checkRuncGoesOn(t, out, img, token, n1, n2)
	b, err := exec.Command("runc", "state", id).CombinedOutput()
	if err != nil || !strings.Contains(string(b), `"running"`) {
		t.Fatalf("runc state after the restore: %v\n%s", err, b)
	}
}

func TestRuncLazyRestore(t *testing.T) {
	// runc's post-copy path with ferry as its criu: `checkpoint
	// --lazy-pages` freezes the container and serves its memory
	// (status-ready reaches runc's --status-fd), `ferry lazy-pages` and
	// `runc restore --lazy-pages` start a copy (another id, on the same
	// host: new namespaces) that runs at once and pulls its pages; once
	// they are all there the source goes and the checkpoint returns. The
	// copy is the same process going on.
	needRoot(t)
	ferryBin, bundle, out := runcBundle(t)
	img := t.TempDir()
	id := fmt.Sprintf("ferry-lazy-%d", os.Getpid())
	for _, c := range []string{id, id + "-r"} {
		t.Cleanup(func() { exec.Command("runc", "delete", "-f", c).Run() })
	}
	runc(t, bundle, "run", "-d", id)
	token, _ := runcState(t, out)
	port := freePort(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	ck := exec.Command("runc", "--criu", ferryBin, "checkpoint", "--lazy-pages", "--page-server", "127.0.0.1:"+port,
		"--status-fd", "3", "--image-path", img, "--work-path", img, id)
	ck.Dir, ck.ExtraFiles = bundle, []*os.File{w}
	if err := ck.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	ckDone := make(chan error, 1)
	go func() { ckDone <- ck.Wait() }()
	t.Cleanup(func() { ck.Process.Kill() })
	r.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := r.Read(make([]byte, 1)); err != nil {
		t.Fatalf("runc checkpoint --lazy-pages: no status: %v", err)
	}
	n1 := stoppedState(out, 0)
	lz := startDaemon(t, "lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port, "-D", img, "-v4", "-o", "lazy.log")
	runc(t, bundle, "--criu", ferryBin, "restore", "--lazy-pages", "-d", "--image-path", img, "--work-path", img, id+"-r")
	waitLazyPages(t, lz, 30*time.Second, filepath.Join(img, "lazy.log"), filepath.Join(img, "dump.log"), filepath.Join(img, "restore.log"))
	select {
	case err := <-ckDone:
		if err != nil {
			t.Fatalf("runc checkpoint --lazy-pages: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("runc checkpoint --lazy-pages did not finish")
	}
	var got string
	var n int
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline) && n <= n1; time.Sleep(100 * time.Millisecond) {
		got, n = runcState(t, out)
	}
	if got != token || n <= n1 {
		t.Fatalf("after the lazy restore the container writes %s %d (before: %s %d)", got, n, token, n1)
	}
	if b, err := exec.Command("runc", "state", id).CombinedOutput(); err == nil {
		t.Fatalf("the source container is still there:\n%s", b)
	}
}

func TestRuncUserNamespace(t *testing.T) {
	// A container with a user namespace mapping its root to the host's
	// uid 100000 (as rootless or remapped containers have): runc with
	// ferry checkpoints and restores it; the same process goes on, in a
	// new user namespace with the same maps.
	needRoot(t)
	ferryBin, bundle, out := runcBundle(t, func(spec map[string]any) {
		linux := spec["linux"].(map[string]any)
		linux["namespaces"] = append(linux["namespaces"].([]any), map[string]any{"type": "user"})
		m := []any{map[string]any{"containerID": 0, "hostID": 100000, "size": 65536}}
		linux["uidMappings"], linux["gidMappings"] = m, m
	})
	// The container's root, uid 100000 here, walks to its root
	// filesystem, which it owns (as a remapped container's), and writes
	// its state.
	for _, d := range []string{filepath.Dir(bundle), bundle} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if b, err := exec.Command("chown", "-R", "100000:100000", filepath.Join(bundle, "rootfs"), out).CombinedOutput(); err != nil {
		t.Fatalf("chown: %v\n%s", err, b)
	}
	img := t.TempDir()
	id := fmt.Sprintf("ferry-userns-%d", os.Getpid())
	t.Cleanup(func() { exec.Command("runc", "delete", "-f", id).Run() })
	runc(t, bundle, "run", "-d", id)
	token, n1 := runcState(t, out)
	_, pid := runcPid(t, id)
	maps, _ := os.ReadFile(fmt.Sprintf("/proc/%d/uid_map", pid))
	runc(t, bundle, "--criu", ferryBin, "checkpoint", "--image-path", img, "--work-path", img, id)
	n2 := stoppedState(out, n1)
	runc(t, bundle, "--criu", ferryBin, "restore", "-d", "--image-path", img, "--work-path", img, id)
	checkRuncGoesOn(t, out, img, token, n1, n2)
	_, rpid := runcPid(t, id)
	if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/uid_map", rpid)); string(b) != string(maps) || len(maps) == 0 {
		t.Fatalf("the restored container's uid_map:\n%s\nbefore:\n%s", b, maps)
	}
}

// runcPid returns the container's status and its init's PID (runc state).
func runcPid(t *testing.T, id string) (string, int) {
	t.Helper()
	b, err := exec.Command("runc", "state", id).CombinedOutput()
	if err != nil {
		t.Fatalf("runc state: %v\n%s", err, b)
	}
	var st struct {
		Status string `json:"status"`
		Pid    int    `json:"pid"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatalf("runc state: %v\n%s", err, b)
	}
	return st.Status, st.Pid
}

// checkRuncGoesOn fails t unless the restored container writes token
// with a count past n2 (it wrote n1 first, n2 when checkpointed): the
// same process going on. It returns that count.
func checkRuncGoesOn(t *testing.T, out, img, token string, n1, n2 int) int {
	t.Helper()
	var got string
	var n3 int
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline) && n3 <= n2; time.Sleep(100 * time.Millisecond) {
		got, n3 = runcState(t, out)
	}
	if got != token || n3 <= n2 || n2 < n1 {
		log, _ := os.ReadFile(filepath.Join(img, "restore.log"))
		t.Fatalf("after the restore the container writes %s %d (before: %s %d..%d): not the same process going on\n%s",
			got, n3, token, n1, n2, log)
	}
	return n3
}

func TestRuncCheckpointPaused(t *testing.T) {
	// runc passes the container's freezer cgroup (freeze_cgroup), and
	// ferry freezes the tree with it. A paused container (its cgroup
	// frozen) is checkpointed with --leave-running: it is frozen again
	// afterwards (still paused, writing nothing), and goes on when
	// resumed; the checkpoint restores to the same process.
	needRoot(t)
	ferryBin, bundle, out := runcBundle(t)
	img := t.TempDir()
	id := fmt.Sprintf("ferry-paused-%d", os.Getpid())
	t.Cleanup(func() { exec.Command("runc", "delete", "-f", id).Run() })
	runc(t, bundle, "run", "-d", id)
	token, n1 := runcState(t, out)
	runc(t, bundle, "pause", id)
	runc(t, bundle, "--criu", ferryBin, "checkpoint", "--leave-running", "--image-path", img, "--work-path", img, id)
	if log, _ := os.ReadFile(filepath.Join(img, "dump.log")); !strings.Contains(string(log), "frozen with the cgroup freezer") {
		t.Fatalf("the checkpoint did not use the freezer:\n%s", log)
	}
	if st, _ := runcPid(t, id); st != "paused" {
		t.Fatalf("after the checkpoint the container is %s, want paused", st)
	}
	n2 := stoppedState(out, n1)
	time.Sleep(500 * time.Millisecond)
	if n := stoppedState(out, n1); n != n2 {
		t.Fatalf("the paused container went on writing (%d, then %d)", n2, n)
	}
	runc(t, bundle, "resume", id)
	nk := 0
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		var got string
		if got, nk = runcState(t, out); got == token && nk > n2+2 {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("after resume the container writes %s %d (before: %s %d..%d)", got, nk, token, n1, n2)
		}
	}
	// The images hold the process as it was: restored in place of the
	// container, it goes on from there.
	runc(t, bundle, "kill", id, "KILL")
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if st, _ := runcPid(t, id); st == "stopped" {
			break
		}
	}
	runc(t, bundle, "delete", id)
	os.Remove(filepath.Join(out, "state"))
	runc(t, bundle, "--criu", ferryBin, "restore", "-d", "--image-path", img, "--work-path", img, id)
	if n3 := checkRuncGoesOn(t, out, img, token, n1, n2); n3 >= nk {
		t.Fatalf("the restored container counts from %d, past %d where the original was killed: not from the checkpoint", n3, nk)
	}
}

// consoleSocket listens on a unix socket for runc's --console-socket and
// returns its path and the pty masters runc sends there.
func consoleSocket(t *testing.T) (string, <-chan *os.File) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "console.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	masters := make(chan *os.File, 4)
	go func() {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			buf, oob := make([]byte, 4096), make([]byte, 64)
			_, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
			c.Close()
			if err != nil {
				continue
			}
			if scms, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil && len(scms) > 0 {
				if fds, err := unix.ParseUnixRights(&scms[0]); err == nil && len(fds) > 0 {
					masters <- os.NewFile(uintptr(fds[0]), "console")
				}
			}
		}
	}()
	return path, masters
}

// master waits for a terminal master on a console socket (consoleSocket),
// closed at the end of the test.
func master(t *testing.T, masters <-chan *os.File) *os.File {
	t.Helper()
	select {
	case m := <-masters:
		t.Cleanup(func() { m.Close() })
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no terminal master on the console socket")
		return nil
	}
}

func TestRuncTerminal(t *testing.T) {
	// A container with a terminal (terminal: true, its master sent to a
	// console socket, as docker run -it has): runc checkpoints it with
	// ferry (orphan_pts_master: the master is outside) and restores it
	// with another console socket, which gets the new master; the same
	// process goes on, writing to the new terminal.
	needRoot(t)
	ferryBin, bundle, out := runcBundle(t, func(spec map[string]any) {
		p := spec["process"].(map[string]any)
		p["terminal"] = true
		p["args"] = []string{"sh", "-c", `t=$$$RANDOM$RANDOM; i=0; while :; do i=$((i+1)); echo "$t $i" > /out/state; echo "tty $t $i"; sleep 0.1; done`}
	})
	sock, masters := consoleSocket(t)
	img := t.TempDir()
	id := fmt.Sprintf("ferry-tty-%d", os.Getpid())
	t.Cleanup(func() { exec.Command("runc", "delete", "-f", id).Run() })
	runc(t, bundle, "run", "-d", "--console-socket", sock, id)
	master(t, masters) // the first terminal, kept open meanwhile
	token, n1 := runcState(t, out)
	runc(t, bundle, "--criu", ferryBin, "checkpoint", "--image-path", img, "--work-path", img, id)
	n2 := stoppedState(out, n1)
	sock2, masters2 := consoleSocket(t)
	runc(t, bundle, "--criu", ferryBin, "restore", "-d", "--console-socket", sock2, "--image-path", img, "--work-path", img, id)
	m2 := master(t, masters2)
	checkRuncGoesOn(t, out, img, token, n1, n2)
	// The new master reads what the process writes on its terminal.
	m2.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4096)
	n, _ := m2.Read(buf)
	if !strings.Contains(string(buf[:n]), "tty "+token) {
		t.Fatalf("the new terminal reads %q, want lines of %s", buf[:n], token)
	}
}
