package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/internal/kernel"
)

func init() { register(newSwrkCmd) }

// criuMajor and criuMinor are the criu release whose protocol ferry's RPC
// service follows, as VERSION answers it (with the name "ferry VERSION").
const criuMajor, criuMinor = 4, 2

func newSwrkCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "swrk FD",
		Short: "serve criu's RPC protocol on an inherited socket, as criu swrk does",
		Long: `Serve criu's RPC protocol (protobuf criu_req / criu_resp messages over a
SOCK_SEQPACKET socket) on the socket at file descriptor FD, the way
"criu swrk FD" does for container engines (runc, podman, containerd) and
go-criu: a program that runs criu as its RPC worker can run ferry instead.

Requests served: VERSION (criu 4.2's protocol, name "ferry VERSION"), CHECK,
FEATURE_CHECK, DUMP, PRE_DUMP and RESTORE, with the options of criu_opts
that ferry has (see the README); an option ferry does not have fails the
request with a message naming it. With notify_scripts the client is
sent each action-script stage (pre-dump, post-dump, network-lock,
setup-namespaces, post-restore, pre-resume, ...) and must answer before
ferry goes on. images_dir_fd and work_dir_fd are descriptors of the
client: ferry opens them through /proc/CLIENT/fd. One request is served,
or more with keep_open.`,
		Example: `  # what go-criu and runc do, with ferry as the criu binary
  runc --criu /usr/local/bin/ferry checkpoint CONTAINER`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			fd, err := strconv.Atoi(args[0])
			if err != nil || fd < 0 {
				return fmt.Errorf("swrk: %q is not a file descriptor", args[0])
			}
			return serveRPC(cmd.Context(), os.NewFile(uintptr(fd), "swrk"), false)
		},
	}
}

// rpcConn is one client of criu's RPC protocol.
type rpcConn struct {
	f    *os.File
	peer *unix.Ucred
	// peerPidfd pins the client's process (SO_PEERPIDFD; -1 if none).
	peerPidfd int
	buf       []byte
	// service: a client of ferry service, whose descriptor numbers are
	// its own (swrk's client passes them to ferry as ferry's).
	service bool
}

// serveRPC serves the requests of the client at f until one comes
// without keep_open, or the client hangs up.
func serveRPC(ctx context.Context, f *os.File, service bool) error {
	defer f.Close()
	peer, err := unix.GetsockoptUcred(int(f.Fd()), unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil {
		return fmt.Errorf("swrk: the client's credentials: %w", err)
	}
	c := &rpcConn{f: f, peer: peer, peerPidfd: -1, buf: make([]byte, 1<<20), service: service}
	if pidfd, err := unix.GetsockoptInt(int(f.Fd()), unix.SOL_SOCKET, unix.SO_PEERPIDFD); err == nil {
		c.peerPidfd = pidfd
		defer unix.Close(pidfd)
	}
	for {
		req, err := c.recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		rctx, stop := c.whileConnected(ctx)
		resp := c.handle(rctx, req)
		stop()
		if err := c.send(resp); err != nil {
			return err
		}
		if !req.GetKeepOpen() {
			return nil
		}
	}
}

// whileConnected returns ctx, canceled if the client hangs up before
// stop is called: a request it can no longer hear about ends (a lazy
// dump waiting for a daemon that will never come resumes the tree
// rather than hold it frozen). It only polls for the hang-up, never
// reads: the request's notifications use the socket meanwhile.
func (c *rpcConn) whileConnected(ctx context.Context) (context.Context, func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		fds := []unix.PollFd{{Fd: int32(c.f.Fd()), Events: unix.POLLRDHUP}}
		for {
			select {
			case <-done:
				return
			default:
			}
			n, err := unix.Poll(fds, 100)
			if err != nil || n == 0 {
				continue // EINTR, or nothing yet
			}
			if fds[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0 {
				cancel()
			}
			if fds[0].Revents != 0 {
				return // hung up, or not a socket to watch (POLLNVAL)
			}
		}
	}()
	return ctx, func() { close(done); cancel() }
}

func (c *rpcConn) recv() (*rpc.CriuReq, error) {
	n, err := c.f.Read(c.buf)
	if n == 0 || errors.Is(err, io.EOF) {
		return nil, io.EOF
	}
	if err != nil {
		return nil, fmt.Errorf("swrk: read a request: %w", err)
	}
	req := &rpc.CriuReq{}
	if err := proto.Unmarshal(c.buf[:n], req); err != nil {
		return nil, fmt.Errorf("swrk: a request of %d bytes: %w", n, err)
	}
	return req, nil
}

func (c *rpcConn) send(resp *rpc.CriuResp) error {
	b, err := proto.Marshal(resp)
	if err != nil {
		return err
	}
	if _, err := c.f.Write(b); err != nil {
		return fmt.Errorf("swrk: send the answer: %w", err)
	}
	return nil
}

// notifyFd is notify with f sent along (SCM_RIGHTS), as criu sends
// orphan-pts-master with the new terminal's master.
func (c *rpcConn) notifyFd(stage string, f *os.File) error {
	b, err := proto.Marshal(&rpc.CriuResp{Type: rpc.CriuReqType_NOTIFY.Enum(), Success: proto.Bool(true),
		Notify: &rpc.CriuNotify{Script: proto.String(stage)}})
	if err != nil {
		return err
	}
	if err := unix.Sendmsg(int(c.f.Fd()), b, unix.UnixRights(int(f.Fd())), nil, 0); err != nil {
		return fmt.Errorf("swrk: notification %s: %w", stage, err)
	}
	return c.ack(stage)
}

// ack waits for the client's answer to the notification stage.
func (c *rpcConn) ack(stage string) error {
	ack, err := c.recv()
	if err != nil {
		return fmt.Errorf("notification %s: %w", stage, err)
	}
	if ack.GetType() != rpc.CriuReqType_NOTIFY || !ack.GetNotifySuccess() {
		return fmt.Errorf("the RPC client failed the notification %s", stage)
	}
	return nil
}

// notify sends stage to the client and waits for its answer
// (notify_scripts).
func (c *rpcConn) notify(stage string, pid int) error {
	err := c.send(&rpc.CriuResp{Type: rpc.CriuReqType_NOTIFY.Enum(), Success: proto.Bool(true),
		Notify: &rpc.CriuNotify{Script: proto.String(stage), Pid: proto.Int32(int32(pid))}})
	if err != nil {
		return err
	}
	return c.ack(stage)
}

func (c *rpcConn) handle(ctx context.Context, req *rpc.CriuReq) *rpc.CriuResp {
	typ := req.GetType()
	resp := &rpc.CriuResp{Type: typ.Enum(), Success: proto.Bool(false)}
	fail := func(err error) *rpc.CriuResp {
		resp.CrErrmsg = proto.String(err.Error())
		// Clients that show no cr_errmsg (runc) show criu's stderr.
		fmt.Fprintf(os.Stderr, "Error (ferry swrk, %v): %v\n", typ, err)
		return resp
	}
	var u *callerReq // a client that is not root (caller.go)
	switch typ {
	case rpc.CriuReqType_DUMP, rpc.CriuReqType_PRE_DUMP, rpc.CriuReqType_RESTORE:
		if c.peer.Uid != 0 && c.peer.Uid != uint32(os.Getuid()) {
			if !c.service {
				return fail(fmt.Errorf("request %v from uid %d: ferry swrk serves its own user's clients only", typ, c.peer.Uid))
			}
			var err error
			if u, err = c.forCaller(req.GetOpts()); err != nil {
				return fail(err)
			}
			defer u.close()
			req = proto.Clone(req).(*rpc.CriuReq)
			req.Opts = u.opts
			ctx = u.context(ctx)
		}
	}
	switch typ {
	case rpc.CriuReqType_VERSION:
		// No gitid: clients read one as a development release of the
		// next version.
		resp.Version = &rpc.CriuVersion{MajorNumber: proto.Int32(criuMajor), MinorNumber: proto.Int32(criuMinor),
			Name: proto.String("ferry " + version)}
	case rpc.CriuReqType_CHECK:
		if err := c.run(ctx, []string{"check"}); err != nil {
			return fail(err)
		}
	case rpc.CriuReqType_FEATURE_CHECK:
		p := kernel.Default()
		f, want := &rpc.CriuFeatures{}, req.GetFeatures()
		if want.MemTrack != nil {
			f.MemTrack = proto.Bool(p.Check("uffd-wp-async") == nil)
		}
		if want.LazyPages != nil {
			f.LazyPages = proto.Bool(p.Check("userfaultfd") == nil)
		}
		if want.PidfdStore != nil {
			f.PidfdStore = proto.Bool(false)
		}
		resp.Features = f
	case rpc.CriuReqType_DUMP, rpc.CriuReqType_PRE_DUMP:
		args, err := c.dumpArgs(typ, req.GetOpts())
		if err != nil {
			return fail(err)
		}
		err = c.run(c.notifying(ctx, req.GetOpts()), args)
		if u != nil {
			// The images are the client's; of a failure, only the log
			// (what was read before it may not be the client's to see).
			var cerr error
			if err == nil {
				cerr = u.copyOut()
			} else {
				cerr = u.copyOut(u.opts.GetLogFile())
			}
			if err == nil {
				err = cerr
			}
		}
		if err != nil {
			return fail(err)
		}
		resp.Dump = &rpc.CriuDumpResp{}
	case rpc.CriuReqType_RESTORE:
		tmp, err := os.MkdirTemp("", "ferry-swrk-")
		if err != nil {
			return fail(err)
		}
		defer os.RemoveAll(tmp)
		pidfile := filepath.Join(tmp, "pid")
		args, err := c.restoreArgs(req.GetOpts(), pidfile)
		if err != nil {
			return fail(err)
		}
		// inherit_fd: the client's descriptors, taken into ferry.
		fds, err := c.takeFds(req.GetOpts().GetInheritFd())
		defer func() {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}()
		if err != nil {
			return fail(err)
		}
		for i, in := range req.GetOpts().GetInheritFd() {
			args = append(args, "--inherit-fd="+fmt.Sprintf("fd[%d]:%s", fds[i], in.GetKey()))
		}
		if u != nil {
			if err := u.copyIn(); err != nil {
				return fail(err)
			}
		}
		rctx := c.notifying(ctx, req.GetOpts())
		if req.GetOpts().GetOrphanPtsMaster() {
			rctx = context.WithValue(rctx, orphanKey{}, func(m *os.File) error { return c.notifyFd("orphan-pts-master", m) })
		}
		err = c.run(rctx, args)
		if u != nil {
			if cerr := u.copyOut(u.opts.GetLogFile(), "stats-restore"); err == nil {
				err = cerr
			}
		}
		if err != nil {
			return fail(err)
		}
		b, err := os.ReadFile(pidfile)
		if err != nil {
			return fail(err)
		}
		pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		resp.Restore = &rpc.CriuRestoreResp{Pid: proto.Int32(int32(pid))}
	default:
		return fail(fmt.Errorf("request %v: not served by ferry", typ))
	}
	resp.Success = proto.Bool(true)
	return resp
}

// statusFd is status_fd as ferry's descriptor: swrk's client passed it
// to ferry; a service client names its own, which ferry copies (-1 if it
// cannot: no status is written then).
func (c *rpcConn) statusFd(fd int32) int {
	if !c.service {
		return int(fd)
	}
	fds, err := c.takeFds([]*rpc.InheritFd{{Key: proto.String("status_fd"), Fd: proto.Int32(fd)}})
	if err != nil {
		return -1
	}
	return fds[0]
}

// takeFds copies the client's descriptors named in ins into ferry.
func (c *rpcConn) takeFds(ins []*rpc.InheritFd) ([]int, error) {
	if len(ins) == 0 {
		return nil, nil
	}
	pidfd := c.peerPidfd
	if pidfd < 0 {
		var err error
		if pidfd, err = unix.PidfdOpen(int(c.peer.Pid), 0); err != nil {
			return nil, fmt.Errorf("inherit_fd: the client %d: %w", c.peer.Pid, err)
		}
		defer unix.Close(pidfd)
	}
	var fds []int
	for _, in := range ins {
		fd, err := unix.PidfdGetfd(pidfd, int(in.GetFd()), 0)
		if err != nil {
			return fds, fmt.Errorf("inherit_fd %s: the client's fd %d: %w", in.GetKey(), in.GetFd(), err)
		}
		fds = append(fds, fd)
	}
	return fds, nil
}

// notifying returns ctx carrying the client as the action-script
// notifier, if the options ask for notifications.
func (c *rpcConn) notifying(ctx context.Context, o *rpc.CriuOpts) context.Context {
	if !o.GetNotifyScripts() {
		return ctx
	}
	return context.WithValue(ctx, notifierKey{}, notifier(c.notify))
}

// run runs a ferry command line in this process; its error output is
// the error.
func (c *rpcConn) run(ctx context.Context, args []string) error {
	var out bytes.Buffer
	// No configuration files: the request says it all (and a client's
	// string must never be read as --config).
	args = append([]string{args[0], "--no-default-config"}, args[1:]...)
	if code := runContext(ctx, args, io.Discard, &out); code != 0 {
		msg := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(out.String()), "Error: "))
		if msg == "" {
			msg = fmt.Sprintf("ferry %s: exit status %d", args[0], code)
		}
		return errors.New(msg)
	}
	return nil
}

// clientPath names the client's descriptor fd: the directory it is open
// on when that resolves (so that paths relative to it, parent_img's,
// work), else its /proc link.
func (c *rpcConn) clientPath(fd int32) string {
	link := fmt.Sprintf("/proc/%d/fd/%d", c.peer.Pid, fd)
	if dir, err := os.Readlink(link); err == nil && filepath.IsAbs(dir) {
		if st, err := os.Stat(dir); err == nil && st.IsDir() {
			return dir
		}
	}
	return link
}

// baseArgs maps the criu_opts every request has: where the images and the
// log go.
func (c *rpcConn) baseArgs(o *rpc.CriuOpts) ([]string, error) {
	var args []string
	switch {
	case o.GetImagesDirFd() >= 0:
		args = append(args, "--images-dir="+c.clientPath(o.GetImagesDirFd()))
	case o.GetImagesDir() != "":
		args = append(args, "--images-dir="+o.GetImagesDir())
	default:
		return nil, errors.New("criu_opts: neither images_dir_fd nor images_dir")
	}
	if o.WorkDirFd != nil {
		args = append(args, "--work-dir="+c.clientPath(o.GetWorkDirFd()))
	}
	if o.LogFile != nil {
		if strings.Contains(o.GetLogFile(), "/") {
			return nil, fmt.Errorf("criu_opts: log_file %q: no directories (use work_dir_fd)", o.GetLogFile())
		}
		args = append(args, "--log-file="+o.GetLogFile())
	}
	args = append(args, "-v"+strconv.Itoa(int(o.GetLogLevel())))
	return args, nil
}

// commonArgs maps the criu_opts both dump and restore have.
func (c *rpcConn) commonArgs(o *rpc.CriuOpts) ([]string, error) {
	args, err := c.baseArgs(o)
	if err != nil {
		return nil, err
	}
	if o.GetRoot() != "" {
		args = append(args, "--root="+o.GetRoot())
	}
	for _, b := range []struct {
		set  bool
		flag string
	}{{o.GetShellJob(), "--shell-job"}, {o.GetTcpEstablished(), "--tcp-established"}, {o.GetFileLocks(), "--file-locks"},
		{o.GetLinkRemap(), "--link-remap"}, {o.GetTcpClose(), "--tcp-close"}, {o.GetDisplayStats(), "--display-stats"},
		{o.GetLazyPages(), "--lazy-pages"}, {o.GetLeaveStopped(), "--leave-stopped"}} {
		if b.set {
			args = append(args, b.flag)
		}
	}
	for _, x := range o.GetExternal() {
		args = append(args, "--external="+x)
	}
	if o.GetCgroupYard() != "" {
		args = append(args, "--cgroup-yard="+o.GetCgroupYard())
	}
	for _, j := range o.GetJoinNs() {
		args = append(args, "--join-ns="+j.GetNs()+":"+j.GetNsFile())
	}
	for _, m := range o.GetExtMnt() {
		args = append(args, "--ext-mount-map="+m.GetKey()+":"+m.GetVal())
	}
	for _, v := range o.GetVeths() {
		args = append(args, "--external="+fmt.Sprintf("veth[%s]:%s", v.GetIfIn(), v.GetIfOut()))
	}
	// What ferry does not do yet fails the request, naming the option.
	for _, u := range []struct {
		set  bool
		name string
	}{

		{len(o.GetExecCmd()) > 0, "exec_cmd"}, {o.GetEmptyNs()&^unix.CLONE_NEWNET != 0, "empty_ns (but net)"},
		{o.GetUnprivileged(), "unprivileged"}} {
		if u.set {
			return nil, fmt.Errorf("criu_opts: %s: not supported by ferry yet", u.name)
		}
	}
	return args, nil
}

func (c *rpcConn) dumpArgs(typ rpc.CriuReqType, o *rpc.CriuOpts) ([]string, error) {
	cmd := "dump"
	args, err := c.commonArgs(o)
	if typ == rpc.CriuReqType_PRE_DUMP {
		// Memory only: the options about the rest do not apply.
		cmd = "pre-dump"
		args, err = c.baseArgs(o)
	}
	if err != nil {
		return nil, err
	}
	pid := o.GetPid()
	if pid == 0 {
		pid = c.peer.Pid // criu's default: the requesting process
	}
	args = append([]string{cmd, "-t", strconv.Itoa(int(pid))}, args...)
	// Both.
	for _, b := range []struct {
		set  bool
		args []string
	}{{o.GetAutoDedup(), []string{"--auto-dedup"}}, {o.ParentImg != nil, []string{"--prev-images-dir=" + o.GetParentImg()}},
		{o.Timeout != nil, []string{"--timeout", strconv.Itoa(int(o.GetTimeout()))}},
		{o.GetFreezeCgroup() != "", []string{"--freeze-cgroup=" + o.GetFreezeCgroup()}},
		// With lazy_pages the page server is where the dump serves the
		// pages itself (and status_fd, ferry's own descriptor as criu's,
		// says when).
		{o.GetPs() != nil && !o.GetLazyPages(), []string{"--page-server", "--address=" + o.GetPs().GetAddress(), "--port=" + strconv.Itoa(int(o.GetPs().GetPort()))}},
		{o.GetPs() != nil && o.GetLazyPages(), []string{"--address=" + o.GetPs().GetAddress(), "--port=" + strconv.Itoa(int(o.GetPs().GetPort()))}},
		{o.StatusFd != nil && o.GetLazyPages(), []string{"--status-fd=" + strconv.Itoa(c.statusFd(o.GetStatusFd()))}}} {
		if b.set {
			args = append(args, b.args...)
		}
	}
	if typ == rpc.CriuReqType_PRE_DUMP {
		return args, nil // pre-dump tracks memory always
	}
	for _, b := range []struct {
		set  bool
		args []string
	}{{o.GetEmptyNs()&unix.CLONE_NEWNET != 0, []string{"--empty-ns", "net"}}, {o.GetLeaveRunning(), []string{"--leave-running"}},
		{o.GetOrphanPtsMaster(), []string{"--orphan-pts-master"}},
		{o.GetCgroupProps() != "", []string{"--cgroup-props=" + o.GetCgroupProps()}},
		{len(o.GetCgroupDumpController()) > 0, cgroupDumpControllers(o)},
		{o.GetCgroupPropsFile() != "", []string{"--cgroup-props-file=" + o.GetCgroupPropsFile()}},
		{o.GetExtUnixSk(), []string{"--ext-unix-sk"}}, {o.GetTrackMem(), []string{"--track-mem"}},
		{o.GetTcpSkipInFlight(), []string{"--skip-in-flight"}},
		{o.GhostLimit != nil, []string{"--ghost-limit", strconv.Itoa(int(o.GetGhostLimit()))}},
		{o.NetworkLock != nil, []string{"--network-lock", strings.ToLower(o.GetNetworkLock().String())}}} {
		if b.set {
			args = append(args, b.args...)
		}
	}
	return args, nil
}

func (c *rpcConn) restoreArgs(o *rpc.CriuOpts, pidfile string) ([]string, error) {
	args, err := c.commonArgs(o)
	if err != nil {
		return nil, err
	}
	args = append([]string{"restore", "-d", "--pidfile", pidfile}, args...)
	if o.ManageCgroupsMode != nil {
		mode := map[rpc.CriuCgMode]string{rpc.CriuCgMode_IGNORE: "ignore", rpc.CriuCgMode_CG_NONE: "none",
			rpc.CriuCgMode_PROPS: "props", rpc.CriuCgMode_SOFT: "soft", rpc.CriuCgMode_FULL: "full",
			rpc.CriuCgMode_STRICT: "strict", rpc.CriuCgMode_DEFAULT: "soft"}[o.GetManageCgroupsMode()]
		args = append(args, "--manage-cgroups="+mode)
	}
	for _, cr := range o.GetCgRoot() {
		root := cr.GetPath()
		if cr.GetCtrl() != "" {
			root = cr.GetCtrl() + ":" + root
		}
		args = append(args, "--cgroup-root="+root)
	}
	if o.GetRstSibling() {
		args = append(args, "--restore-sibling")
	}
	if o.GetWeakSysctls() {
		args = append(args, "--weak-sysctls")
	}
	return args, nil
}

// cgroupDumpControllers is cgroup_dump_controller as dump's options.
func cgroupDumpControllers(o *rpc.CriuOpts) []string {
	var out []string
	for _, c := range o.GetCgroupDumpController() {
		out = append(out, "--cgroup-dump-controller="+c)
	}
	return out
}
