package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/internal/proc"
)

// A client of ferry service that is not root may dump and restore its
// own processes only, and with its own rights (dumpcore's and
// restorecore's Options.Caller). ferry, as root, never works in the
// client's directories by name, where the client could have put a
// symlink to a file of root's: the images are made in a directory of
// ferry's own and copied into the client's (each file made anew there,
// never through a symlink, and given to the client), or, for a restore,
// copied from it (regular files the client owns, not through a
// symlink) before the restore reads them.

// callerKey carries the *proc.Caller a command acts for in its context.
type callerKey struct{}

// callerOf returns the caller cmd acts for, if any.
func callerOf(ctx context.Context) *proc.Caller {
	c, _ := ctx.Value(callerKey{}).(*proc.Caller)
	return c
}

// callerReq is a request of a client that is not root: its options
// rewritten to name ferry's directory, and the client's directories.
type callerReq struct {
	caller       *proc.Caller
	opts         *rpc.CriuOpts
	tmp          string
	images, work *os.File
}

// forCaller checks that a client that is not root asks nothing it may
// not, and prepares its request.
func (c *rpcConn) forCaller(o *rpc.CriuOpts) (*callerReq, error) {
	for _, x := range []struct {
		set  bool
		name string
	}{
		{o.GetImagesDirFd() < 0, "images_dir (a path; give images_dir_fd)"}, {o.ParentImg != nil, "parent_img"},
		{o.Ps != nil, "ps (page server)"}, {o.GetLazyPages(), "lazy_pages"}, {len(o.GetExtMnt()) > 0, "ext_mnt"},
		{o.GetRoot() != "", "root"}, {len(o.GetExternal()) > 0, "external"}, {len(o.GetJoinNs()) > 0, "join_ns"},
		{len(o.GetVeths()) > 0, "veths"}, {o.GetEmptyNs() != 0, "empty_ns"}, {len(o.GetInheritFd()) > 0, "inherit_fd"},
		{len(o.GetCgRoot()) > 0, "cg_root"}, {o.GetTcpEstablished(), "tcp_established"}, {o.NetworkLock != nil, "network_lock"},
		{o.FreezeCgroup != nil, "freeze_cgroup"}, {o.GetLinkRemap(), "link_remap"},
		{o.CgroupPropsFile != nil, "cgroup_props_file"}, {o.CgroupYard != nil, "cgroup_yard"},
		{o.ManageCgroupsMode != nil && o.GetManageCgroupsMode() != rpc.CriuCgMode_IGNORE, "manage_cgroups_mode (but ignore)"},
	} {
		if x.set {
			return nil, fmt.Errorf("criu_opts: %s: not allowed for a client that is not root (uid %d)", x.name, c.peer.Uid)
		}
	}
	if c.peerPidfd < 0 {
		return nil, fmt.Errorf("the client %d cannot be pinned (no SO_PEERPIDFD): only root is served", c.peer.Pid)
	}
	groups, err := peerGroups(int(c.f.Fd()))
	if err != nil {
		return nil, fmt.Errorf("the client's groups (SO_PEERGROUPS): %w", err)
	}
	caller, err := proc.ReadCaller(c.peerPidfd, int(c.peer.Pid), c.peer.Uid, c.peer.Gid, groups)
	if err != nil {
		return nil, err
	}
	u := &callerReq{caller: caller}
	ins := []*rpc.InheritFd{{Key: proto.String("images_dir_fd"), Fd: proto.Int32(o.GetImagesDirFd())}}
	if o.WorkDirFd != nil {
		ins = append(ins, &rpc.InheritFd{Key: proto.String("work_dir_fd"), Fd: proto.Int32(o.GetWorkDirFd())})
	}
	fds, err := c.takeFds(ins)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), ins[i].GetKey())
		if i == 0 {
			u.images = f
		} else {
			u.work = f
		}
	}
	if err != nil {
		u.close()
		return nil, err
	}
	// Directories of the client's own: ferry makes and removes files
	// there, which the client could do itself.
	for _, d := range []*os.File{u.images, u.work} {
		if d == nil {
			continue
		}
		var st unix.Stat_t
		if err := unix.Fstat(int(d.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR || st.Uid != caller.Uid {
			u.close()
			return nil, fmt.Errorf("criu_opts: %s is not a directory of the client's (uid %d)", d.Name(), caller.Uid)
		}
	}
	if u.tmp, err = os.MkdirTemp("", "ferry-caller-"); err != nil {
		u.close()
		return nil, err
	}
	u.opts = proto.Clone(o).(*rpc.CriuOpts)
	u.opts.ImagesDirFd, u.opts.ImagesDir, u.opts.WorkDirFd = proto.Int32(-1), proto.String(u.tmp), nil
	return u, nil
}

func (u *callerReq) close() {
	for _, f := range []*os.File{u.images, u.work} {
		if f != nil {
			f.Close()
		}
	}
	if u.tmp != "" {
		os.RemoveAll(u.tmp)
	}
}

// context returns ctx carrying the caller.
func (u *callerReq) context(ctx context.Context) context.Context {
	return context.WithValue(ctx, callerKey{}, u.caller)
}

// copyIn copies the images from the client's directory into ferry's:
// regular files the client owns, opened without following a symlink.
func (u *callerReq) copyIn() error {
	dir, err := u.list(u.images)
	if err != nil {
		return err
	}
	for _, name := range dir {
		// Looked at before it is opened (O_PATH: a device node is not
		// opened), then opened through that.
		pfd, err := unix.Openat(int(u.images.Fd()), name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("images %s: %w", name, err)
		}
		var st unix.Stat_t
		err = unix.Fstat(pfd, &st)
		if err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
			unix.Close(pfd)
			continue // not a regular file (a symlink, ...): not an image
		}
		if st.Uid != u.caller.Uid {
			unix.Close(pfd)
			return fmt.Errorf("images %s belongs to uid %d, not to the client's %d", name, st.Uid, u.caller.Uid)
		}
		fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", pfd), unix.O_RDONLY|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
		unix.Close(pfd)
		if err != nil {
			return fmt.Errorf("images %s: %w", name, err)
		}
		src := os.NewFile(uintptr(fd), name)
		dst, err := os.OpenFile(u.tmp+"/"+name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err == nil {
			_, err = io.Copy(dst, src)
			if cerr := dst.Close(); err == nil {
				err = cerr
			}
		}
		src.Close()
		if err != nil {
			return fmt.Errorf("images %s: %w", name, err)
		}
	}
	return nil
}

// copyOut copies files from ferry's directory into the client's: the
// log (log_file) into its work directory if it gave one, the rest (all
// files, or those named) into its images directory; each made anew, the
// client's.
func (u *callerReq) copyOut(names ...string) error {
	if names == nil {
		var err error
		if names, err = u.list(nil); err != nil {
			return err
		}
	}
	for _, name := range names {
		src, err := os.Open(u.tmp + "/" + name)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		dir := u.images
		if u.work != nil && name == u.opts.GetLogFile() {
			dir = u.work
		}
		err = u.writeInto(dir, name, src)
		src.Close()
		if err != nil {
			return fmt.Errorf("%s into the client's directory: %w", name, err)
		}
	}
	return nil
}

// writeInto makes name anew in dir (what was there removed; never a
// symlink followed), the client's, with src's contents.
func (u *callerReq) writeInto(dir *os.File, name string, src io.Reader) error {
	dfd := int(dir.Fd())
	if err := unix.Unlinkat(dfd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return err
	}
	fd, err := unix.Openat(dfd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	if err := f.Chown(int(u.caller.Uid), int(u.caller.Gid)); err != nil {
		return err
	}
	_, err = io.Copy(f, src)
	return err
}

// list names the regular files of dir (ferry's own with nil).
func (u *callerReq) list(dir *os.File) ([]string, error) {
	var d *os.File
	if dir == nil {
		var err error
		if d, err = os.Open(u.tmp); err != nil {
			return nil, err
		}
	} else {
		fd, err := unix.Openat(int(dir.Fd()), ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		d = os.NewFile(uintptr(fd), dir.Name())
	}
	defer d.Close()
	ents, err := d.ReadDir(-1)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if e.Type().IsRegular() {
			out = append(out, e.Name())
		}
	}
	return out, nil
}
