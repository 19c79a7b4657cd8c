package restorecore

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/compel"
)

// makeMntNs makes the root's new mount namespace (CLONE_NEWNS: a copy of
// ferry's) into the tree's: every mount made private (as unshare(1) does,
// so nothing propagates back to ferry's), the mounts the tree did not
// have detached, then its own mounts made in order, a tmpfs filled with
// its files as soon as it is mounted. The mount calls run inside the
// root; the files are written through /proc/ROOT/root.
func (r *restorer) makeMntNs(root *compel.Task) error {
	n := r.is.inv.MntNs
	if err := mountIn(root, "none", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make the mounts private: %w", err)
	}
	// A root of its own: bound first, every mount made under it, then
	// pivoted into.
	top := n.Root
	if r.opts.Root != "" {
		top = r.opts.Root
	}
	if top != "" {
		if err := mountIn(root, top, top, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind the root %s: %w", top, err)
		}
	}
	for _, p := range n.Unmounted {
		if err := umountIn(root, p); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("detach %s: %w", p, err)
		}
	}
	for _, m := range n.Mounts {
		var err error
		point := filepath.Join(top, m.Point)
		if m.Fstype == "bind" || m.Fstype == "external" {
			src := m.Source
			if m.Inner {
				src = filepath.Join(top, src)
			}
			if m.Fstype == "external" {
				if src = r.opts.ExternalMounts[m.Source]; src == "" {
					return fmt.Errorf("%w: mount %s is external (key %q): name it with --external mnt[%s]:PATH", ErrValidation, m.Point, m.Source, m.Source)
				}
			}
			err = mountIn(root, src, point, "", unix.MS_BIND|unix.MS_REC, "")
			if err == nil && m.Flags != 0 {
				err = mountIn(root, "none", point, "", unix.MS_BIND|unix.MS_REMOUNT|m.Flags, "")
			}
		} else {
			flags := m.Flags
			if m.Contents != "" {
				flags &^= unix.MS_RDONLY // filled first
			}
			data := r.mountData(m.Data)
			if m.Fstype == "overlay" && m.Inner {
				data = overlayUnder(top, data) // made before the pivot
			}
			err = mountIn(root, m.Source, point, m.Fstype, flags, data)
		}
		if err != nil {
			return fmt.Errorf("mount %s (%s): %w", m.Point, m.Fstype, err)
		}
		if m.Fstype == "devpts" && m.Point == "/dev/pts" {
			// Its terminals whose masters were outside the dump, before
			// anything binds one (a container's /dev/console).
			if err := r.makeOrphanPtys(root, filepath.Join(point, "ptmx")); err != nil {
				return err
			}
		}
		if m.Contents != "" {
			untar := func() error {
				return r.untar(filepath.Join(r.is.dir, m.Contents), fmt.Sprintf("/proc/%d/root%s", root.Tid, point))
			}
			if err := r.inUserNsFs(untar); err != nil {
				return fmt.Errorf("files of the tmpfs at %s: %w", m.Point, err)
			}
			if m.Flags&unix.MS_RDONLY != 0 {
				if err := mountIn(root, "none", point, "", unix.MS_REMOUNT|m.Flags, r.mountData(m.Data)); err != nil {
					return fmt.Errorf("tmpfs at %s read-only: %w", m.Point, err)
				}
			}
		}
	}
	if top != "" {
		if n.RootFlags&unix.MS_RDONLY != 0 {
			if err := mountIn(root, "none", top, "", unix.MS_BIND|unix.MS_REMOUNT|n.RootFlags, ""); err != nil {
				return fmt.Errorf("root read-only: %w", err)
			}
		}
		if err := pivotIn(root, top); err != nil {
			return fmt.Errorf("pivot_root into %s: %w", top, err)
		}
	}
	r.log.Info("mount namespace made", "detached", len(n.Unmounted), "mounts", len(n.Mounts))
	return nil
}

// mountIn runs mount(2) inside t, its strings in t's stack scratch.
func mountIn(t *compel.Task, source, target, fstype string, flags uint64, data string) error {
	addr := stackScratch(t)
	var buf []byte
	put := func(s string) uint64 {
		a := addr + uint64(len(buf))
		buf = append(append(buf, s...), 0)
		return a
	}
	src, tgt, typ, dat := put(source), put(target), put(fstype), put(data)
	if fstype == "" {
		typ = 0
	}
	if data == "" {
		dat = 0
	}
	if len(buf) > 4000 {
		return fmt.Errorf("mount %s: arguments too long", target)
	}
	if err := compel.WriteMem(t.Tid, []compel.Segment{{Addr: addr, Local: buf}}); err != nil {
		return err
	}
	_, err := t.Syscall(unix.SYS_MOUNT, src, tgt, typ, flags, dat)
	return err
}

// pivotIn makes dir t's root (pivot_root into it, the old root detached)
// and its working directory.
func pivotIn(t *compel.Task, dir string) error {
	addr := stackScratch(t)
	buf := append(append([]byte(dir), 0), '.', 0, '/', 0)
	if err := compel.WriteMem(t.Tid, []compel.Segment{{Addr: addr, Local: buf}}); err != nil {
		return err
	}
	dot, slash := addr+uint64(len(dir))+1, addr+uint64(len(dir))+3
	if _, err := t.Syscall(unix.SYS_CHDIR, addr); err != nil {
		return err
	}
	if _, err := t.Syscall(unix.SYS_PIVOT_ROOT, dot, dot); err != nil {
		return err
	}
	if _, err := t.Syscall(unix.SYS_UMOUNT2, dot, unix.MNT_DETACH); err != nil {
		return err
	}
	_, err := t.Syscall(unix.SYS_CHDIR, slash)
	return err
}

// umountIn detaches the mount at target inside t.
func umountIn(t *compel.Task, target string) error {
	addr := stackScratch(t)
	if err := compel.WriteMem(t.Tid, []compel.Segment{{Addr: addr, Local: append([]byte(target), 0)}}); err != nil {
		return err
	}
	_, err := t.Syscall(unix.SYS_UMOUNT2, addr, unix.MNT_DETACH)
	return err
}

// untar writes the files of the tar file name under dir, with their
// modes, owners and times.
func (r *restorer) untar(name, dir string) error {
	f, err := os.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	var dirs []*tar.Header
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		p := filepath.Join(dir, filepath.Clean("/"+h.Name))
		if err := noSymlinkBetween(dir, p); err != nil {
			return fmt.Errorf("%s: %s: %w", name, h.Name, err)
		}
		mode := uint32(h.Mode & 0o7777)
		switch h.Typeflag {
		case tar.TypeDir:
			if h.Name != "./" {
				if err := os.Mkdir(p, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
					return err
				}
			}
			dirs = append(dirs, h)
			continue // modes and times once the files are in
		case tar.TypeReg:
			w, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
			if err != nil {
				return err
			}
			_, err = io.Copy(w, tr)
			if cerr := w.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("%s: %w", h.Name, err)
			}
		case tar.TypeSymlink:
			if err := os.Symlink(h.Linkname, p); err != nil {
				return err
			}
			os.Lchown(p, h.Uid, h.Gid)
			continue
		case tar.TypeFifo:
			if err := unix.Mkfifo(p, mode); err != nil {
				return fmt.Errorf("%s: %w", h.Name, err)
			}
		case tar.TypeChar, tar.TypeBlock:
			kind := uint32(unix.S_IFCHR)
			if h.Typeflag == tar.TypeBlock {
				kind = unix.S_IFBLK
			}
			if err := unix.Mknod(p, kind|mode, int(unix.Mkdev(uint32(h.Devmajor), uint32(h.Devminor)))); err != nil {
				return fmt.Errorf("%s: %w", h.Name, err)
			}
		default:
			r.log.Warn("tmpfs entry of an unknown kind left out", "name", h.Name, "type", h.Typeflag)
			continue
		}
		if err := setAttrs(p, h); err != nil {
			return err
		}
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := setAttrs(filepath.Join(dir, filepath.Clean("/"+dirs[i].Name)), dirs[i]); err != nil {
			return err
		}
	}
	return nil
}

// noSymlinkBetween refuses a path below dir whose parents (below dir)
// include a symlink: an entry under one would be written wherever the
// link points, outside the tmpfs (the tar could say anything).
func noSymlinkBetween(dir, p string) error {
	rel, err := filepath.Rel(dir, filepath.Dir(p))
	if err != nil || rel == "." {
		return err
	}
	cur := dir
	for _, c := range strings.Split(rel, string(filepath.Separator)) {
		cur = filepath.Join(cur, c)
		st, err := os.Lstat(cur)
		if err != nil {
			return err
		}
		if st.Mode()&os.ModeSymlink != 0 {
			return fmt.Errorf("a symlink (%s) among its parents", cur)
		}
	}
	return nil
}

func setAttrs(p string, h *tar.Header) error {
	if err := os.Lchown(p, h.Uid, h.Gid); err != nil {
		return err
	}
	if err := os.Chmod(p, os.FileMode(h.Mode&0o777)|modeBits(h.Mode)); err != nil {
		return err
	}
	return os.Chtimes(p, h.AccessTime, h.ModTime)
}

// modeBits carries setuid, setgid and sticky from a tar mode.
func modeBits(m int64) os.FileMode {
	var out os.FileMode
	if m&0o4000 != 0 {
		out |= os.ModeSetuid
	}
	if m&0o2000 != 0 {
		out |= os.ModeSetgid
	}
	if m&0o1000 != 0 {
		out |= os.ModeSticky
	}
	return out
}

// overlayUnder returns overlay options whose layers (lowerdir, upperdir,
// workdir) name paths of a root of the tree's own as seen from where it
// is here, top, before the restore pivots into it.
func overlayUnder(top, data string) string {
	return mapOptions(data, func(k, v string) string {
		if k != "lowerdir" && k != "upperdir" && k != "workdir" {
			return v
		}
		dirs := strings.Split(v, ":")
		for j, d := range dirs {
			if strings.HasPrefix(d, "/") {
				dirs[j] = filepath.Join(top, d)
			}
		}
		return strings.Join(dirs, ":")
	})
}
