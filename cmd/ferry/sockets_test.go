package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/dumpcore"
	"github.com/ferrycr/ferry/internal/testutil"
)

// ask connects to addr over network and returns the line the server sends
// ("TOKEN COUNT").
func ask(t *testing.T, network, addr string) string {
	t.Helper()
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		t.Fatalf("%s %s: %v", network, addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if network == "udp" {
		if _, err := c.Write([]byte("hi")); err != nil {
			t.Fatal(err)
		}
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("%s %s: %v", network, addr, err)
	}
	return strings.TrimSpace(line)
}

func TestDumpRestoreInetSockets(t *testing.T) {
	// Listening TCP sockets (IPv4, and IPv6 taking v4-mapped clients) and a
	// bound UDP socket, with options set: after restore the same process
	// (same token) answers on the same ports, and checks its options.
	w, before := startC(t, "netserve")
	port := func(r testutil.Report, k string) string { return strconv.Itoa(int(r.Int(k))) }
	v4 := net.JoinHostPort("127.0.0.1", port(before, "tcp4"))
	mapped := net.JoinHostPort("127.0.0.1", port(before, "tcp6"))
	v6 := net.JoinHostPort("::1", port(before, "tcp6"))
	udp := net.JoinHostPort("127.0.0.1", port(before, "udp"))
	for _, a := range [][2]string{{"tcp", v4}, {"tcp", mapped}, {"tcp", v6}, {"udp", udp}} {
		if got := ask(t, a[0], a[1]); !strings.HasPrefix(got, before.Token+" ") {
			t.Fatalf("%s %s answered %q before the dump, token %s", a[0], a[1], got, before.Token)
		}
	}
	r := dumpRestore(t, w)
	after := r.Report(t)
	if after.Status != "ok" || after.Token != before.Token {
		t.Fatalf("after restore: %v", after)
	}
	for _, a := range [][2]string{{"tcp", v4}, {"tcp", mapped}, {"tcp", v6}, {"udp", udp}} {
		got := ask(t, a[0], a[1])
		f := strings.Fields(got)
		if len(f) != 2 || f[0] != before.Token {
			t.Fatalf("%s %s answered %q after restore; the token was %s", a[0], a[1], got, before.Token)
		}
		if n, _ := strconv.Atoi(f[1]); n <= 4 {
			t.Fatalf("%s %s: connection number %d after restore, more than 4 were served before", a[0], a[1], n)
		}
	}
	if r := r.Report(t); r.Status != "ok" {
		t.Fatalf("after serving: %v", r)
	}
}

func TestDumpRestorePythonHTTPServer(t *testing.T) {
	// A real server from Debian: python3 -m http.server, checkpointed while
	// it listens, serves again after restore. The page it serves holds a
	// token, and the restored process must be the same one (same PID, and
	// its log file continues).
	needRoot(t)
	dir := t.TempDir()
	token := strconv.FormatInt(time.Now().UnixNano(), 36)
	if err := os.WriteFile(filepath.Join(dir, "index.html"), []byte(token), 0o644); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(t.TempDir(), "http.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("python3", "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", dir)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	defer func() { unix.Kill(pid, unix.SIGKILL); testutil.WaitGone(pid, 5*time.Second) }()
	var port string
	if !waitFor(10*time.Second, func() bool {
		b, _ := os.ReadFile(logPath)
		if m := regexp.MustCompile(`port (\d+)`).FindSubmatch(b); m != nil {
			port = string(m[1])
			return true
		}
		return false
	}) {
		t.Fatal("http.server did not say its port")
	}
	get := func() string {
		t.Helper()
		c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := c.Get("http://127.0.0.1:" + port + "/index.html")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("GET: %s", resp.Status)
		}
		return string(b)
	}
	if got := get(); got != token {
		t.Fatalf("served %q before the dump", got)
	}
	// The server closes a connection after answering (HTTP/1.0); wait until
	// only its listener is left.
	if !waitFor(5*time.Second, func() bool {
		ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		n := 0
		for _, e := range ents {
			if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); strings.HasPrefix(l, "socket:") {
				n++
			}
		}
		return n == 1
	}) {
		t.Fatal("the server kept its connection open")
	}
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(pid), "-D", img)
	cmd.Wait()
	mustFerry(t, "restore", "-D", img, "-d")
	if !testutil.PidAlive(pid) {
		t.Fatalf("no process %d after restore", pid)
	}
	if got := get(); got != token {
		t.Fatalf("served %q after restore", got)
	}
	b, _ := os.ReadFile(logPath)
	if n := strings.Count(string(b), `"GET /index.html`); n != 2 {
		t.Fatalf("the log shows %d requests, want 2 (one before the dump, one after):\n%s", n, b)
	}
}

func TestDumpRefusesEstablishedTCP(t *testing.T) {
	// An established connection is not dumped yet: the dump fails naming
	// it, and the process runs on untouched.
	needRoot(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	cmd := exec.Command("python3", "-c", "import socket,time; s=socket.create_connection(('127.0.0.1',"+port+")); time.sleep(60)")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	code, out := ferry(t, "dump", "-t", strconv.Itoa(cmd.Process.Pid), "-D", t.TempDir())
	if code != 1 || !strings.Contains(out, "TCP connection 127.0.0.1:") || !strings.Contains(out, "-> 127.0.0.1:"+port) {
		t.Fatalf("dump of an established connection: exit %d\n%s", code, out)
	}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if !strings.Contains(string(b), "TracerPid:\t0") || !strings.Contains(string(b), "SigBlk:\t0000000000000000") {
		t.Fatalf("the process was not left as it was:\n%s", b)
	}
}

func TestDumpRestoreTCPEstablished(t *testing.T) {
	// Two clients hold connections to a server across dump and restore
	// (--tcp-established): one has a line in the server's receive queue
	// (sent while the server was frozen), the other has 4 MiB on its way
	// (in the server's send queue, in flight, and in the server's memory).
	// The same connections carry on: the restored server answers the
	// queued line, the 4 MiB arrive intact, and new lines are answered.
	needRoot(t)
	bin := testutil.BuildC(t, "tcpecho")
	w := testutil.Start(t, "-r", bin)
	before := w.Report(t)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(int(before.Int("port"))))
	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(30 * time.Second))
		return c, bufio.NewReader(c)
	}
	expect := func(r *bufio.Reader, want string) {
		t.Helper()
		got, err := r.ReadString('\n')
		if err != nil || strings.TrimSpace(got) != want {
			t.Fatalf("got %q (%v), want %q", got, err, want)
		}
	}
	c1, r1 := dial()
	c2, r2 := dial()
	fmt.Fprintf(c1, "a\n")
	expect(r1, before.Token+" 1 a")
	fmt.Fprintf(c2, "big\n")
	time.Sleep(100 * time.Millisecond) // let the send queue fill

	img := t.TempDir()
	_, err := dumpcore.Dump(context.Background(), dumpcore.Options{
		Pid: w.Pid, ImagesDir: img, TCPEstablished: true,
		Frozen: func() {
			fmt.Fprintf(c1, "b\n") // lands in the frozen server's receive queue
			time.Sleep(50 * time.Millisecond)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	w.Reap(t)
	mustFerry(t, "restore", "-D", img, "-d")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()

	expect(r1, before.Token+" 2 b")
	expect(r2, before.Token+" big")
	tok, _ := strconv.ParseUint(before.Token, 16, 64)
	big := make([]byte, 4<<20)
	if _, err := io.ReadFull(r2, big); err != nil {
		t.Fatalf("reading the 4 MiB after restore: %v", err)
	}
	s := tok
	for i := range big {
		s ^= s << 13
		s ^= s >> 7
		s ^= s << 17
		if big[i] != byte(s) {
			t.Fatalf("byte %d of the 4 MiB differs after restore", i)
		}
	}
	fmt.Fprintf(c1, "c\n")
	expect(r1, before.Token+" 3 c")
	fmt.Fprintf(c2, "d\n")
	expect(r2, before.Token+" 2 d")
}

func TestDumpLeaveRunningTCPEstablished(t *testing.T) {
	// dump -R --tcp-established takes the connections out of repair mode
	// again: the process goes on serving them.
	needRoot(t)
	bin := testutil.BuildC(t, "tcpecho")
	w := testutil.Start(t, "-r", bin)
	before := w.Report(t)
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(before.Int("port")))), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	fmt.Fprintf(c, "a\n")
	r.ReadString('\n')
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir(), "-R", "--tcp-established")
	fmt.Fprintf(c, "b\n")
	if got, err := r.ReadString('\n'); err != nil || strings.TrimSpace(got) != before.Token+" 2 b" {
		t.Fatalf("after dump -R: %q, %v", got, err)
	}
}

// resp sends one inline command to redis on c and returns the reply's
// first line (and, for a bulk string, the line after it).
func resp(t *testing.T, c net.Conn, r *bufio.Reader, cmd string) string {
	t.Helper()
	if _, err := fmt.Fprintf(c, "%s\r\n", cmd); err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	line = strings.TrimSpace(line)
	if strings.HasPrefix(line, "$") && line != "$-1" {
		next, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		line += " " + strings.TrimSpace(next)
	}
	return line
}

func TestDumpRestoreRedisWithClient(t *testing.T) {
	// redis-server from Debian with a million keys, and a client whose
	// connection stays open across dump and restore (--tcp-established):
	// the same connection answers afterwards, with the same keys.
	needRoot(t)
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server is not installed (make deps installs it)")
	}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	_, port, _ := net.SplitHostPort(l.Addr().String())
	l.Close()
	dir := t.TempDir()
	cmd := exec.Command("redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--enable-debug-command", "local", "--dir", dir, "--logfile", filepath.Join(dir, "redis.log"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	defer func() { unix.Kill(pid, unix.SIGKILL); testutil.WaitGone(pid, 5*time.Second) }()
	var c net.Conn
	if !waitFor(10*time.Second, func() bool {
		var err error
		c, err = net.Dial("tcp", "127.0.0.1:"+port)
		return err == nil
	}) {
		t.Fatal("redis-server does not accept connections")
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	r := bufio.NewReader(c)
	if got := resp(t, c, r, "DEBUG POPULATE 1000000"); got != "+OK" {
		t.Fatalf("DEBUG POPULATE: %s", got)
	}
	if got := resp(t, c, r, "SET held-open "+port); got != "+OK" {
		t.Fatalf("SET: %s", got)
	}
	img := t.TempDir()
	if d, err := os.MkdirTemp("/dev/shm", "ferry-redis-"); err == nil {
		img = d
		defer os.RemoveAll(d)
	}
	mustFerry(t, "dump", "-t", strconv.Itoa(pid), "-D", img, "--tcp-established")
	cmd.Wait()
	mustFerry(t, "restore", "-D", img, "-d")
	for _, q := range [][2]string{
		{"GET held-open", "$" + strconv.Itoa(len(port)) + " " + port},
		{"DBSIZE", ":1000001"},
		{"GET key:987654", "$12 value:987654"},
		{"INCR after-restore", ":1"},
	} {
		if got := resp(t, c, r, q[0]); got != q[1] {
			t.Fatalf("%s on the connection held across the restore: %q, want %q", q[0], got, q[1])
		}
	}
	c2, err := net.Dial("tcp", "127.0.0.1:"+port)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if got := resp(t, c2, bufio.NewReader(c2), "GET after-restore"); got != "$1 1" {
		t.Fatalf("a new connection: %q", got)
	}
}

func TestNetworkLockKeepsPeersOut(t *testing.T) {
	// A client writes while its server is between dump and restore. With
	// the network lock its packets are dropped, retransmitted, and
	// answered by the restored server; with --network-lock skip the host
	// answers them with a reset (so the lock is what saves the connection).
	needRoot(t)
	bin := testutil.BuildC(t, "tcpecho")
	for _, lock := range []string{"nftables", "skip"} {
		w := testutil.Start(t, "-r", bin)
		before := w.Report(t)
		c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(before.Int("port")))), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		r := bufio.NewReader(c)
		c.SetDeadline(time.Now().Add(20 * time.Second))
		fmt.Fprintf(c, "a\n")
		r.ReadString('\n')
		img := t.TempDir()
		mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--tcp-established", "--network-lock", lock)
		w.Reap(t)
		fmt.Fprintf(c, "gap\n") // nobody has the connection now
		time.Sleep(100 * time.Millisecond)
		mustFerry(t, "restore", "-D", img, "-d")
		rw := testutil.Attach(t, w.Pid, w.ReportPath)
		got, err := r.ReadString('\n')
		switch lock {
		case "nftables":
			if err != nil || strings.TrimSpace(got) != before.Token+" 2 gap" {
				t.Fatalf("with the lock: %q, %v", got, err)
			}
			nft, err := nftables.New()
			if err != nil {
				t.Fatal(err)
			}
			tables, err := nft.ListTables()
			if err != nil {
				t.Fatal(err)
			}
			for _, tb := range tables {
				if tb.Name == "ferry-lock-"+strconv.Itoa(w.Pid) {
					t.Fatalf("the lock %s is still there after the restore", tb.Name)
				}
			}
		case "skip":
			if err == nil {
				t.Fatalf("without the lock the connection survived the gap (%q): the test proves nothing", got)
			}
		}
		c.Close()
		rw.Kill()
	}
}

func TestDumpRestoreUnixSockets(t *testing.T) {
	// Stream, datagram and seqpacket socketpairs with data queued (byte
	// for byte and message for message), and listeners on a path and an
	// abstract name: after restore the queues hold what they held and the
	// listeners answer with the process's token.
	needRoot(t)
	bin := testutil.BuildC(t, "unixsock")
	path := filepath.Join(t.TempDir(), "server.sock")
	w := testutil.Start(t, "-r", bin, "-l", path)
	before := w.Report(t)
	if before.Status != "ok" {
		t.Fatalf("before the dump: %v", before)
	}
	abstract := "@ferry-unixsock-" + strconv.Itoa(w.Pid)
	for _, a := range []string{path, abstract} {
		if got := ask(t, "unix", a); !strings.HasPrefix(got, before.Token+" ") {
			t.Fatalf("%s answered %q", a, got)
		}
	}
	r := dumpRestore(t, w)
	r.Signal(unix.SIGUSR2) // check the queues
	time.Sleep(50 * time.Millisecond)
	after := r.Report(t)
	if after.Status != "ok" || after.Fields["queues"] != "ok" || after.Token != before.Token {
		t.Fatalf("after restore: %v", after)
	}
	for _, a := range []string{path, abstract} {
		if got := ask(t, "unix", a); !strings.HasPrefix(got, before.Token+" ") {
			t.Fatalf("%s answered %q after restore", a, got)
		}
	}
}

func TestDumpRefusesExternalUnixPeer(t *testing.T) {
	// A unix connection to a process outside the dump is refused, named,
	// and the process runs on.
	needRoot(t)
	path := filepath.Join(t.TempDir(), "outside.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cmd := exec.Command("python3", "-c", "import socket,time; s=socket.socket(socket.AF_UNIX); s.connect('"+path+"'); time.sleep(60)")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	code, out := ferry(t, "dump", "-t", strconv.Itoa(cmd.Process.Pid), "-D", t.TempDir())
	if code != 1 || !strings.Contains(out, "unix socket connected to socket:[") || !strings.Contains(out, "outside the process") {
		t.Fatalf("dump with an external unix peer: exit %d\n%s", code, out)
	}
	if !testutil.PidAlive(cmd.Process.Pid) {
		t.Fatal("the process is gone")
	}
}

func TestDumpRestorePty(t *testing.T) {
	// Two pty pairs inside the process, one its controlling terminal, with
	// termios, window size and packet mode set: after restore the process
	// finds the same /dev/pts/N, settings and controlling terminal, and
	// bytes flow both ways.
	w, before := startC(t, "ptycheck")
	r := dumpRestore(t, w)
	after := r.Report(t)
	checkContinued(t, before, after)
	if after.Int("pty") != before.Int("pty") {
		t.Fatalf("pty %d after restore, %d before", after.Int("pty"), before.Int("pty"))
	}
}

// startUnixSender starts, in a session of its own, a python3 process
// that draws a token once and sends "TOKEN COUNT" followed by end every
// 20 ms on a unix socket of sockType (SOCK_DGRAM, SOCK_STREAM) connected
// to path. The test ends it, or its restored self, by PID.
func startUnixSender(t *testing.T, sockType, path, end string) *exec.Cmd {
	t.Helper()
	script := `import os, socket, time
tok = os.urandom(8).hex()
s = socket.socket(socket.AF_UNIX, socket.` + sockType + `)
s.connect("` + path + `")
n = 0
while True:
    n += 1
    s.send(("%s %d` + end + `" % (tok, n)).encode())
    time.sleep(0.02)
`
	cmd := exec.Command("python3", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() { unix.Kill(pid, unix.SIGKILL); testutil.WaitGone(pid, 5*time.Second) })
	return cmd
}

// sockIno is the inode of a test's own socket, as --ext-unix-sk and
// --external unix[] name it.
func sockIno(t *testing.T, c syscall.Conn) uint64 {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := rc.Control(func(fd uintptr) { unix.Fstat(int(fd), &st) }); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestDumpRestoreExternalUnixDgram(t *testing.T) {
	// --ext-unix-sk (here criu's spelling, --external unix[INODE]): a
	// datagram socket connected to a socket of another process (a
	// syslog-like collector here) is connected to that name again; the
	// restored sender's datagrams reach the collector.
	needRoot(t)
	path := filepath.Join(t.TempDir(), "log.sock")
	coll, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer coll.Close()
	cmd := startUnixSender(t, "SOCK_DGRAM", path, "")
	pid := cmd.Process.Pid
	read := func() (string, int) {
		t.Helper()
		buf := make([]byte, 128)
		coll.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := coll.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		f := strings.Fields(string(buf[:n]))
		c, _ := strconv.Atoi(f[1])
		return f[0], c
	}
	tok, before := read()
	if code, out := ferry(t, "dump", "-t", strconv.Itoa(pid), "-D", t.TempDir()); code != 1 || !strings.Contains(out, "--ext-unix-sk") {
		t.Fatalf("dump without --ext-unix-sk: exit %d\n%s", code, out)
	}
	img := t.TempDir()
	// criu's spelling: --external unix[INODE of the collector's socket].
	mustFerry(t, "dump", "-t", strconv.Itoa(pid), "-D", img, "--external", fmt.Sprintf("unix[%d]", sockIno(t, coll)))
	cmd.Wait()
	for drained := false; !drained; { // what was sent before the dump
		coll.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		_, err := coll.Read(make([]byte, 128))
		drained = err != nil
	}
	mustFerry(t, "restore", "-D", img, "-d")
	got, after := read()
	if got != tok || after <= before {
		t.Fatalf("after restore: %s %d, before: %s %d", got, after, tok, before)
	}
}

func TestDumpRestoreTCPHalfClosed(t *testing.T) {
	// The server shut its connection down for writing (fin-wait2; the
	// client has read the end of the stream): after dump and restore
	// the server still receives what the client sends.
	needRoot(t)
	bin := testutil.BuildC(t, "tcpecho")
	w := testutil.Start(t, "-r", bin)
	before := w.Report(t)
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(before.Int("port")))), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(c)
	fmt.Fprintf(c, "a\nhalf\n")
	r.ReadString('\n')
	if _, err := r.ReadString('\n'); err != io.EOF {
		t.Fatalf("after half: %v, want the end of the stream", err)
	}
	time.Sleep(50 * time.Millisecond) // the FIN acknowledged: fin-wait2
	rw := dumpRestore(t, w, "--tcp-established")
	defer rw.Kill()
	fmt.Fprintf(c, "after\n")
	if !waitFor(5*time.Second, func() bool { return rw.Report(t).Int("halfread") == 1 }) {
		t.Fatalf("the restored server did not receive the line sent after the restore: %v", rw.Report(t))
	}
}

func TestDumpRestoreDescriptorsInFlight(t *testing.T) {
	// Descriptors in flight (SCM_RIGHTS) over a datagram and a stream
	// socketpair: a pipe's read end (closed in the process: only the queue
	// holds it) and a regular file. After restore the receiver gets them
	// with their messages, and they work.
	needRoot(t)
	dir := t.TempDir()
	script := `import array, os, signal, socket, sys, time
d = sys.argv[1]
dg = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
st = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
r, w = os.pipe()
os.write(w, b"through the pipe")
p = os.path.join(d, "file")
open(p, "w").write("in the file")
f = os.open(p, os.O_RDONLY)
dg[0].sendmsg([b"first"])
dg[0].sendmsg([b"with a pipe"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
st[0].sendall(b"before ")
st[0].sendmsg([b"with a file"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f]))])
st[0].sendall(b" after")
os.close(r); os.close(f)
tok = os.urandom(8).hex()
want = [True]
def usr1(*a): want[0] = True
signal.signal(signal.SIGUSR1, usr1)
seq, result = 0, ""
def recv(sk, n):
    msg, anc, _, _ = sk.recvmsg(n, socket.CMSG_SPACE(16))
    fds = []
    for lvl, typ, data in anc:
        fds += list(array.array("i", data[:len(data) - len(data) % 4]))
    return msg, fds
while True:
    if want[0]:
        want[0] = False
        seq += 1
        if seq == 3:
            m1, f1 = recv(dg[1], 100)
            m2, f2 = recv(dg[1], 100)
            s, g = b"", []
            while len(s) < 24:
                b, fds = recv(st[1], 100)
                s, g = s + b, g + fds
            ok = m1 == b"first" and not f1 and m2 == b"with a pipe" and len(f2) == 1 and os.read(f2[0], 100) == b"through the pipe"
            ok = ok and s == b"before with a file after" and len(g) == 1 and os.read(g[0], 100) == b"in the file"
            result = "inflight=%s\n" % ("ok" if ok else "fail %r" % ([m1, f1, m2, f2, s, g],))
        open(sys.argv[2] + ".tmp", "w").write("status=ok\npid=%d\ntoken=%s\ncounter=%d\nseq=%d\n%s" % (os.getpid(), tok, seq, seq, result))
        os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(0.01)
`
	_, after := dumpRestorePython(t, script, dir)
	if after.Fields["inflight"] != "ok" {
		t.Fatalf("descriptors in flight after restore: %q", after.Fields["inflight"])
	}
}

func TestDumpRestoreTCPPeerClosed(t *testing.T) {
	// A connection whose peer shut down writing, its end in close-wait
	// with a line and the FIN unread: after dump and restore the server
	// reads the line, then the end of the stream, and its answer still
	// reaches the client.
	testPeerClosed(t, "", []string{"--tcp-established"}, nil)
}

func TestDumpRestoreTCPClose(t *testing.T) {
	// --tcp-close, given to the restore (criu's way) or to the dump:
	// both ends of the connection come back closed.
	t.Run("restore", func(t *testing.T) {
		testPeerClosed(t, "closed", []string{"--tcp-established"}, []string{"--tcp-close"})
	})
	t.Run("dump", func(t *testing.T) { testPeerClosed(t, "closed", []string{"--tcp-close"}, nil) })
}

func testPeerClosed(t *testing.T, mode string, dumpArgs, restoreArgs []string) {
	var args []string
	if mode != "" {
		args = append(args, mode)
	}
	w := startSelfCheck(t, "peerclosed.py", args...)
	before := w.Report(t)
	if before.Int("server_state") != 8 {
		t.Fatalf("the server's end is in TCP state %d before the dump, want 8 (close-wait)", before.Int("server_state"))
	}
	rw := dumpRestoreWith(t, w, dumpArgs, restoreArgs)
	defer rw.Kill()
	after := rw.Report(t)
	checkContinued(t, before, after)
	if want := map[string]int64{"": 8, "closed": 7}[mode]; after.Int("server_state") != want {
		t.Fatalf("the server's end is in TCP state %d after the restore, want %d", after.Int("server_state"), want)
	}
	checkSelf(t, rw)
}

func TestDumpRestoreListeners(t *testing.T) {
	// Two listeners sharing a port (SO_REUSEPORT, turned off on the first
	// once bound) and a connection waiting unaccepted: the dump refuses
	// it, naming the listener, unless --skip-in-flight; after the restore
	// both listeners have their options and a new connection is served.
	w := startSelfCheck(t, "listeners.py")
	checkRefused(t, w, "waiting to be accepted", "--skip-in-flight")
	checkAcross(t, w, "--skip-in-flight", "--tcp-established")
}

func TestDumpRestoreUDPShutdown(t *testing.T) {
	// A connected UDP socket shut down for writing stays so after the
	// restore (sock_diag tells the dump), and still receives.
	selfCheckAcross(t, "udpshut.py")
}

func TestDumpRestoreSeqpacketPeerClosed(t *testing.T) {
	// A seqpacket socket with records queued and its peer gone: reading
	// its queue for the dump ends at the end of the stream (the dump used
	// to loop on it), and after the restore the records, then the end,
	// are read.
	selfCheckAcross(t, "seqpeer.py")
}

func TestDumpRestoreUnixRelativeName(t *testing.T) {
	// A listener bound to a relative name is bound again relative to the
	// process's working directory (entered before its files are made),
	// and the name left by the dumped process there is replaced.
	selfCheckAcross(t, "unixrel.py")
}

func TestDumpRestoreBoundDgramOrphanQueue(t *testing.T) {
	// A bound datagram socket holding messages from a sender that closed:
	// the messages come back in order and the socket is bound again, so a
	// new sender reaches it by its name. A client connected to a bound
	// server stays connected to it, and a socket connected to its own name
	// hears itself.
	checkAcross(t, startSelfCheck(t, "dgrambound.py", t.TempDir()))
}

func TestDumpRestoreUnixPendingConnections(t *testing.T) {
	// A unix listener with two connections waiting to be accepted (the
	// second one's client closed): both are waiting again after restore,
	// in order, the first still joined to its client.
	checkAcross(t, startSelfCheck(t, "unixpending.py", t.TempDir()))
}

func TestDumpRestoreEpollInFlight(t *testing.T) {
	// An epoll sent over SCM_RIGHTS and closed by its sender comes back in
	// the queue, still watching the socket it watched.
	selfCheckAcross(t, "epollflight.py")
}

func TestDumpRestoreExternalUnixStream(t *testing.T) {
	// --ext-unix-sk with a stream connection to another process's server
	// (a journald-like collector here): the restored client connects to
	// the server's name again, a new connection the server accepts, and
	// its lines go on (same token, counter going on).
	needRoot(t)
	path := filepath.Join(t.TempDir(), "stream.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	conns := make(chan *net.UnixConn, 4)
	go func() {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			conns <- c
		}
	}()
	cmd := startUnixSender(t, "SOCK_STREAM", path, "\\n")
	pid := cmd.Process.Pid
	var c *net.UnixConn
	select {
	case c = <-conns:
	case <-time.After(5 * time.Second):
		t.Fatal("no connection")
	}
	defer c.Close()
	last := func(c *net.UnixConn) (string, int) {
		t.Helper()
		buf := make([]byte, 4096)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(string(buf[:n])), "\n")
		f := strings.Fields(lines[len(lines)-1])
		k, _ := strconv.Atoi(f[1])
		return f[0], k
	}
	tok, before := last(c)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(pid), "-D", img, "--ext-unix-sk="+strconv.FormatUint(sockIno(t, c), 10))
	cmd.Wait()
	mustFerry(t, "restore", "-D", img, "-d")
	var c2 *net.UnixConn
	select {
	case c2 = <-conns:
	case <-time.After(5 * time.Second):
		t.Fatal("the restored client did not connect again")
	}
	defer c2.Close()
	got, after := last(c2)
	if got != tok || after <= before {
		t.Fatalf("after restore: %s %d, before: %s %d", got, after, tok, before)
	}
}
