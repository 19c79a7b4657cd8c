package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/pageserver"
	"github.com/ferrycr/ferry/pki"
	"github.com/ferrycr/ferry/transport"
)

// preDumpResult: frozen time of each pre-dump round (issue target: ≤ 10 ms,
// flat in size).
type preDumpResult struct {
	SizeMiB      int       `json:"size_mib"`
	RoundsFrozen []float64 `json:"rounds_frozen_ms"`
	RoundsPages  []uint64  `json:"rounds_pages_written"`
	FinalFrozen  float64   `json:"final_dump_frozen_ms"`
	TargetMs     float64   `json:"target_ms"`
}

// backgroundResult: a background snapshot (dump --background) of a
// workload rewriting 10 MiB/s (issue target: frozen ≤ 30 ms at 4 GiB),
// next to a plain dump -R of the same process.
type backgroundResult struct {
	SizeMiB       int     `json:"size_mib"`
	DirtyMiBs     int     `json:"dirty_mib_s"`
	FrozenMs      float64 `json:"frozen_ms"`
	TotalMs       float64 `json:"total_ms"`
	FinalPages    uint64  `json:"final_pages_written"`
	PlainFrozenMs float64 `json:"plain_dump_R_frozen_ms"`
	TargetMs      float64 `json:"target_ms"`
}

// lazyResult: post-copy restore on one host, end to end. The workload is
// the init of a PID namespace of its own, so that the restore can make it
// again (in a new one) while the frozen source still holds its PIDs:
// dump --lazy-pages until it serves, the lazy-pages daemon until it is
// ready, the restore until the process runs (ToRunningMs, from the dump's
// start), then until the daemon has delivered every page. The same bytes
// are then copied over loopback TCP (the issue's "measured bandwidth") and
// written to fresh memory (what the target's kernel must do for each
// page; on this VM the host maps guest memory in on first touch, and that
// is the slower of the two). Both run after the restored process ended, on
// memory it freed moments before, so they are if anything fast.
//
// Flow "daemon" is criu's sequence of three commands (dump --lazy-pages,
// lazy-pages, restore --lazy-pages); flow "restore" has the restore serve
// the pages itself (restore --lazy-pages --page-server): one process start
// fewer on the target.
type lazyResult struct {
	SizeMiB      int     `json:"size_mib"`
	Flow         string  `json:"flow"`
	DumpLazyMs   float64 `json:"dump_lazy_pages_until_serving_ms"`
	DaemonMs     float64 `json:"lazy_pages_daemon_until_ready_ms"`
	RestoreMs    float64 `json:"restore_until_running_ms"`
	TargetMs     float64 `json:"target_daemon_start_to_running_ms"`
	ToRunningMs  float64 `json:"dump_start_to_running_ms"`
	ToAllPagesMs float64 `json:"to_all_pages_ms"`
	TargetMsGoal float64 `json:"target_ms"`
	TCPCopyMs    float64 `json:"plain_tcp_copy_ms"`
	FillMs       float64 `json:"fresh_memory_fill_ms"`
	VsTCP        float64 `json:"all_pages_vs_tcp_copy"`
	VsFloor      float64 `json:"all_pages_vs_slower_of_tcp_and_fill"`
	GoalVsTCP    float64 `json:"target_vs_tcp_copy"`
}

type streamResult struct {
	Bytes   int64   `json:"bytes"`
	Mode    string  `json:"mode"`
	Ms      float64 `json:"ms"`
	MBps    float64 `json:"mb_s"`
	VsPlain float64 `json:"vs_plain_tcp"`
}

func startWorkload(wl, dir string, mib int, extra ...string) (*exec.Cmd, string, error) {
	report := filepath.Join(dir, "report")
	os.Remove(report)
	cmd := exec.Command(wl, append([]string{"-m", strconv.Itoa(mib), "-r", report}, extra...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, "", err
	}
	return cmd, report, waitFile(report, 60*time.Second)
}

func frozen(img string) (float64, uint64) {
	var st pb.Stats
	if err := images.ReadOne(img, "stats-dump", images.KindStats, &st); err != nil || st.Dump == nil {
		return -1, 0
	}
	return float64(st.Dump.FrozenTimeUs) / 1000, st.Dump.PagesWritten
}

func benchPreDump(ferry, wl, dir string, mib int) (preDumpResult, error) {
	r := preDumpResult{SizeMiB: mib, TargetMs: 10}
	cmd, _, err := startWorkload(wl, dir, mib, "-t", "2")
	if err != nil {
		return r, err
	}
	pid := cmd.Process.Pid
	defer func() { unix.Kill(pid, unix.SIGKILL); cmd.Wait() }()
	root := filepath.Join(dir, "chain")
	os.RemoveAll(root)
	for i := 1; i <= 4; i++ {
		d := filepath.Join(root, strconv.Itoa(i))
		os.MkdirAll(d, 0o755)
		args := []string{"pre-dump", "-t", strconv.Itoa(pid), "-D", d}
		if i == 4 {
			args[0] = "dump"
		}
		if i > 1 {
			args = append(args, "--prev-images-dir", "../"+strconv.Itoa(i-1))
		}
		if b, err := exec.Command(ferry, args...).CombinedOutput(); err != nil {
			return r, fmt.Errorf("%v: %v\n%s", args, err, b)
		}
		f, pages := frozen(d)
		if i == 4 {
			r.FinalFrozen = f
		} else {
			r.RoundsFrozen = append(r.RoundsFrozen, f)
			r.RoundsPages = append(r.RoundsPages, pages)
		}
		time.Sleep(100 * time.Millisecond)
	}
	os.RemoveAll(root)
	return r, nil
}

func benchBackground(ferry, wl, dir string, mib int) (backgroundResult, error) {
	r := backgroundResult{SizeMiB: mib, DirtyMiBs: 10, TargetMs: 30}
	cmd, _, err := startWorkload(wl, dir, mib, "-t", "2", "-C", "-c", "10")
	if err != nil {
		return r, err
	}
	pid := cmd.Process.Pid
	defer func() { unix.Kill(pid, unix.SIGKILL); cmd.Wait() }()
	img := filepath.Join(dir, "bg")
	defer os.RemoveAll(img)
	for _, args := range [][]string{{"-R"}, {"--background"}} {
		os.RemoveAll(img)
		os.MkdirAll(img, 0o755)
		full := append([]string{"dump", "-t", strconv.Itoa(pid), "-D", img}, args...)
		if b, err := exec.Command(ferry, full...).CombinedOutput(); err != nil {
			return r, fmt.Errorf("%v: %v\n%s", full, err, b)
		}
		var st pb.Stats
		if err := images.ReadOne(img, "stats-dump", images.KindStats, &st); err != nil || st.Dump == nil {
			return r, fmt.Errorf("stats-dump: %v", err)
		}
		if args[0] == "-R" {
			r.PlainFrozenMs = float64(st.Dump.FrozenTimeUs) / 1000
			continue
		}
		r.FrozenMs = float64(st.Dump.FrozenTimeUs) / 1000
		r.TotalMs = float64(st.Dump.TotalTimeUs) / 1000
		r.FinalPages = st.Dump.PagesWritten
	}
	return r, nil
}

// waitStatus starts cmd with a status pipe as fd 3 and returns once it
// has written its ready byte.
func waitStatus(cmd *exec.Cmd) error {
	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	defer pr.Close()
	cmd.ExtraFiles = []*os.File{pw}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Start()
	pw.Close()
	if err != nil {
		return err
	}
	b := make([]byte, 1)
	if _, err := pr.Read(b); err != nil {
		cmd.Wait()
		return fmt.Errorf("%s said nothing on --status-fd: %v: %s", cmd.Args[1], err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

func benchLazy(ferry, wl, dir string, mib int, flow string) (lazyResult, error) {
	r := lazyResult{SizeMiB: mib, Flow: flow, TargetMsGoal: 60, GoalVsTCP: 1.3}
	report := filepath.Join(dir, "report")
	os.Remove(report)
	cmd := exec.Command("unshare", "--pid", "--fork", "--kill-child", "setsid", wl, "-m", strconv.Itoa(mib), "-t", "2", "-r", report)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return r, err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if err := waitFile(report, 60*time.Second); err != nil {
		return r, err
	}
	var src int // the workload, PID 1 of its namespace, as seen here
	for _, pid := range proc.Children(cmd.Process.Pid) {
		src = pid
	}
	if src == 0 {
		return r, fmt.Errorf("unshare %d has no child", cmd.Process.Pid)
	}
	img := filepath.Join(dir, "lazyimg")
	os.RemoveAll(img)
	os.MkdirAll(img, 0o755)
	defer os.RemoveAll(img)
	port, err := freePort()
	if err != nil {
		return r, err
	}
	// Source: freeze, write the images, serve the pages.
	dl := exec.Command(ferry, "dump", "-t", strconv.Itoa(src), "-D", img, "--lazy-pages", "--address", "127.0.0.1", "--port", port, "--status-fd", "3")
	t0 := time.Now()
	if err := waitStatus(dl); err != nil {
		return r, fmt.Errorf("dump --lazy-pages: %v", err)
	}
	defer func() { dl.Process.Kill(); dl.Wait() }()
	r.DumpLazyMs = ms(time.Since(t0))
	// Target: the daemon, then the restore; or the restore alone, ready
	// (status-fd) once the process runs.
	t1 := time.Now()
	pidfile := filepath.Join(dir, "lazy.pid")
	os.Remove(pidfile)
	var daemon *exec.Cmd
	if flow == "daemon" {
		daemon = exec.Command(ferry, "lazy-pages", "-D", img, "--page-server", "--address", "127.0.0.1", "--port", port, "--status-fd", "3")
		if err := waitStatus(daemon); err != nil {
			return r, err
		}
		r.DaemonMs = ms(time.Since(t1))
	}
	t2 := time.Now()
	if daemon != nil {
		if b, err := exec.Command(ferry, "restore", "-D", img, "-d", "--lazy-pages", "--pidfile", pidfile).CombinedOutput(); err != nil {
			daemon.Process.Kill()
			daemon.Wait()
			return r, fmt.Errorf("lazy restore: %v\n%s", err, b)
		}
	} else {
		daemon = exec.Command(ferry, "restore", "-D", img, "-d", "--lazy-pages", "--pidfile", pidfile,
			"--page-server", "--address", "127.0.0.1", "--port", port, "--status-fd", "3")
		if err := waitStatus(daemon); err != nil {
			return r, fmt.Errorf("lazy restore: %v", err)
		}
	}
	r.RestoreMs = ms(time.Since(t2))
	r.TargetMs = ms(time.Since(t1))
	r.ToRunningMs = ms(time.Since(t0))
	b, _ := os.ReadFile(pidfile)
	restored, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	defer func() {
		if restored > 0 {
			unix.Kill(restored, unix.SIGKILL)
			waitGone(restored)
		}
	}()
	err = daemon.Wait()
	r.ToAllPagesMs = ms(time.Since(t0))
	if err != nil {
		return r, fmt.Errorf("lazy-pages: %v", err)
	}
	os.Remove(report)
	unix.Kill(restored, unix.SIGUSR1)
	werr := waitFile(report, 60*time.Second)
	b, _ = os.ReadFile(report)
	if werr != nil || !strings.Contains(string(b), "status=ok") {
		return r, fmt.Errorf("lazily restored workload failed its check: %v\n%s", werr, b)
	}
	unix.Kill(restored, unix.SIGKILL)
	waitGone(restored)
	restored = 0
	size := int64(mib) << 20
	if r.TCPCopyMs, err = plainCopy(size, pageBuffer()); err != nil {
		return r, err
	}
	if r.FillMs, err = freshFill(size, pageBuffer()); err != nil {
		return r, err
	}
	r.VsTCP = r.ToAllPagesMs / r.TCPCopyMs
	r.VsFloor = r.ToAllPagesMs / max(r.TCPCopyMs, r.FillMs)
	return r, nil
}

// freshFill copies buf over size bytes of memory this process maps anew,
// in small pages as UFFDIO_COPY places them, and returns the time taken.
func freshFill(size int64, buf []byte) (float64, error) {
	mem, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return 0, fmt.Errorf("mmap %d bytes: %w", size, err)
	}
	defer unix.Munmap(mem)
	unix.Madvise(mem, unix.MADV_NOHUGEPAGE)
	t0 := time.Now()
	for off := 0; off < len(mem); off += len(buf) {
		copy(mem[off:], buf)
	}
	return ms(time.Since(t0)), nil
}

// pageBuffer returns 4 MiB of incompressible bytes, like real pages.
func pageBuffer() []byte {
	buf := make([]byte, 4<<20)
	x := uint64(88172645463325252)
	for i := 0; i+8 <= len(buf); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(buf[i:], x)
	}
	return buf
}

// plainCopy sends size bytes of buf over loopback TCP to a reader that
// discards them: the limit of any page stream on this path.
func plainCopy(size int64, buf []byte) (float64, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	done := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			_, err = io.Copy(io.Discard, c)
			c.Close()
		}
		done <- err
	}()
	t0 := time.Now()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		return 0, err
	}
	for sent := int64(0); sent < size; sent += int64(len(buf)) {
		if _, err := c.Write(buf); err != nil {
			c.Close()
			return 0, err
		}
	}
	c.Close()
	err = <-done
	return ms(time.Since(t0)), err
}

// freePort returns a TCP port of loopback nobody listens on.
func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port), nil
}

// benchStream sends size bytes through a page-server session on loopback
// (TCP, with and without zstd) and through a plain TCP copy.
func benchStream(dir string, size int64) ([]streamResult, error) {
	buf := pageBuffer()
	plain := func() (float64, error) { return plainCopy(size, buf) }
	// Certificates for the TLS and QUIC sessions.
	certDir := filepath.Join(dir, "certs")
	os.MkdirAll(certDir, 0o700)
	defer os.RemoveAll(certDir)
	ca, err := pki.NewCA("bench CA", time.Hour)
	if err != nil {
		return nil, err
	}
	caPath := filepath.Join(certDir, "ca.crt")
	if err := ca.WriteCert(caPath); err != nil {
		return nil, err
	}
	srvCert, srvKey, err := ca.Issue(certDir, "server", 2, time.Hour)
	if err != nil {
		return nil, err
	}
	cliCert, cliKey, err := ca.Issue(certDir, "client", 3, time.Hour)
	if err != nil {
		return nil, err
	}
	srvTLS := transport.TLS{Enabled: true, CACert: caPath, Cert: srvCert, Key: srvKey}
	cliTLS := transport.TLS{Enabled: true, CACert: caPath, Cert: cliCert, Key: cliKey}
	ps := func(network string, secure, zstd bool) (float64, error) {
		out := filepath.Join(dir, "ps-out")
		os.RemoveAll(out)
		os.MkdirAll(out, 0o755)
		defer os.RemoveAll(out)
		st, ct := transport.TLS{}, transport.TLS{}
		if secure {
			st, ct = srvTLS, cliTLS
		}
		l, err := transport.ListenOn(network, "127.0.0.1:0", st, nil)
		if err != nil {
			return 0, err
		}
		done := make(chan error, 1)
		go func() {
			_, err := pageserver.Serve(context.Background(), pageserver.Options{Dir: out, Listener: l})
			done <- err
		}()
		t0 := time.Now()
		c, err := pageserver.Connect(context.Background(), network, l.Addr().String(), ct, zstd)
		if err != nil {
			return 0, err
		}
		w, err := c.Create("pages-1.img")
		if err != nil {
			return 0, err
		}
		for sent := int64(0); sent < size; sent += int64(len(buf)) {
			if _, err := w.Write(buf); err != nil {
				return 0, err
			}
		}
		w.Close()
		if err := c.Finish(); err != nil {
			return 0, err
		}
		err = <-done
		return ms(time.Since(t0)), err
	}
	base, err := plain()
	if err != nil {
		return nil, err
	}
	res := []streamResult{{Bytes: size, Mode: "plain tcp copy", Ms: base, MBps: float64(size) / 1e6 / (base / 1000), VsPlain: 1}}
	for _, m := range []struct {
		name, network string
		secure        bool
	}{{"tcp", transport.TCP, false}, {"tls", transport.TCP, true}, {"quic", "quic", true}} {
		for _, z := range []bool{false, true} {
			t, err := ps(m.network, m.secure, z)
			if err != nil {
				return nil, fmt.Errorf("page-server %s: %w", m.name, err)
			}
			mode := "page-server " + m.name
			if z {
				mode += "+zstd"
			}
			res = append(res, streamResult{Bytes: size, Mode: mode, Ms: t, MBps: float64(size) / 1e6 / (t / 1000), VsPlain: t / base})
		}
	}
	return res, nil
}
