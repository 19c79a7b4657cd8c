package dumpcore

import (
	"archive/tar"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
)

// mntNamespace describes the tree's mount namespace, if it has one of its
// own, as its difference from ferry's: a new namespace starts as a copy
// of the one it is made from, so the restore makes a copy of its own and
// applies the difference. The tree's own mounts may be proc, sysfs,
// mqueue, tmpfs (its files go in the images as a tar file) and bind
// mounts of what ferry sees too; a root of its own (pivot_root, as
// containers have) and other filesystems are refused by name.
func (t *tree) mntNamespace() (*pb.MntNs, error) {
	if t.ownNs["mnt"] == "" {
		return nil, nil
	}
	theirs, err := proc.ReadMountinfo(t.root)
	if err != nil {
		return nil, err
	}
	mine, err := proc.ReadMountinfo(os.Getpid())
	if err != nil {
		return nil, err
	}
	key := func(m proc.Mount) string { return m.Point + "\x00" + m.Dev + "\x00" + m.Root + "\x00" + m.FsType }
	rootOf := func(ms []proc.Mount) string {
		k := ""
		for _, m := range ms {
			if m.Point == "/" {
				k = key(m) // the last one stacked there is what is seen
			}
		}
		return k
	}
	have, had := map[string]bool{}, map[string]bool{}
	out := &pb.MntNs{}
	if rootOf(theirs) != rootOf(mine) {
		// A root of its own: every mount of the tree is made again under
		// it, the root itself bound from where ferry sees it.
		var root proc.Mount
		for _, m := range theirs {
			if m.Point == "/" {
				root = m
			}
		}
		out.Root, out.RootFlags = t.opts.Root, mountFlags(root.Opts)
		if out.Root == "" {
			out.Root = bindSource(mine, root)
		}
		if out.Root == "" {
			return nil, fmt.Errorf("the root of the mount namespace of %d (%s of %s) is not a directory ferry sees: %w (name it with --root)",
				t.root, root.FsType, root.Source, ErrUnsupported)
		}
		for _, m := range theirs {
			if m.Point == "/" {
				had[key(m)] = true // the root: bound, not made
			}
		}
	} else {
		for _, m := range mine {
			have[key(m)] = true
		}
	}
	for i, m := range theirs {
		if had[key(m)] {
			continue
		}
		had[key(m)] = true
		if have[key(m)] {
			continue // the copy has it
		}
		om := &pb.OwnMount{Point: m.Point, Flags: mountFlags(m.Opts), Data: fsData(m.Super)}
		if ext, ok := t.opts.ExternalMounts[m.Point]; ok {
			// --external mnt[POINT]:KEY: the restore binds what KEY
			// names there.
			om.Fstype, om.Source, om.Data = "external", ext, ""
			out.Mounts = append(out.Mounts, om)
			continue
		}
		switch fresh := m.Root == "/"; {
		case fresh && (m.FsType == "proc" || m.FsType == "sysfs" || m.FsType == "mqueue" || m.FsType == "tmpfs" ||
			m.FsType == "devpts" || m.FsType == "cgroup" || m.FsType == "cgroup2"):
			// Mounted whole: mounted anew.
			om.Fstype, om.Source = m.FsType, m.Source
		case fresh && m.FsType == "overlay" && bindSource(mine, m) == "":
			// An overlay the tree made: made again from its layers (its
			// options name them as the tree sees them, which the restore
			// does too: its upper layer on a tmpfs of the tree's is
			// filled first, the tmpfs coming before it). Under a root of
			// its own they are paths in it (Inner).
			om.Fstype, om.Source, om.Inner = m.FsType, m.Source, out.Root != ""
		default:
			om.Fstype, om.Data = "bind", ""
			if src := bindSource(theirs[:i], m); src != "" && out.Root != "" {
				om.Source, om.Inner = src, true // from one of the tree's own mounts
			} else if src := bindSource(mine, m); src != "" {
				om.Source = src
			} else {
				return nil, fmt.Errorf("mount %s (%s of %s) in the mount namespace of %d, which ferry cannot see: %w",
					m.Point, m.FsType, m.Source, t.root, ErrUnsupported)
			}
		}
		if om.Fstype == "tmpfs" {
			om.Contents = fmt.Sprintf("tmpfs-%d.tar", m.ID)
			if err := t.tarTmpfs(om.Contents, m); err != nil {
				return nil, fmt.Errorf("tmpfs at %s: %w", m.Point, err)
			}
		}
		out.Mounts = append(out.Mounts, om)
	}
	for i := len(mine) - 1; i >= 0 && out.Root == ""; i-- {
		if !had[key(mine[i])] {
			out.Unmounted = append(out.Unmounted, mine[i].Point)
		}
	}
	return out, nil
}

// bindSource finds where ferry sees the directory m mounts: a mount of
// the same filesystem whose root holds m's.
func bindSource(mine []proc.Mount, m proc.Mount) string {
	for _, o := range mine {
		if o.Dev != m.Dev {
			continue
		}
		if rest, ok := strings.CutPrefix(m.Root, o.Root); ok && (rest == "" || strings.HasPrefix(rest, "/") || o.Root == "/") {
			return filepath.Join(o.Point, rest)
		}
	}
	return ""
}

// mountFlags maps per-mount options to MS_* flags.
func mountFlags(opts string) uint64 {
	var f uint64
	for _, o := range strings.Split(opts, ",") {
		switch o {
		case "ro":
			f |= unix.MS_RDONLY
		case "nosuid":
			f |= unix.MS_NOSUID
		case "nodev":
			f |= unix.MS_NODEV
		case "noexec":
			f |= unix.MS_NOEXEC
		case "noatime":
			f |= unix.MS_NOATIME
		case "nodiratime":
			f |= unix.MS_NODIRATIME
		case "relatime":
			f |= unix.MS_RELATIME
		case "strictatime":
			f |= unix.MS_STRICTATIME
		}
	}
	return f
}

// fsData keeps the filesystem options a mount takes (not rw/ro, which
// are per mount, nor the ones the kernel only reports).
func fsData(super string) string {
	var keep []string
	for _, o := range strings.Split(super, ",") {
		switch {
		case o == "rw" || o == "ro", strings.HasPrefix(o, "seclabel"), o == "inode64", o == "inode32":
		default:
			keep = append(keep, o)
		}
	}
	return strings.Join(keep, ",")
}

// tarTmpfs writes the files of the tmpfs m (seen through the root's
// /proc/PID/root, mounts below it left out) into the images as name.
func (t *tree) tarTmpfs(name string, m proc.Mount) error {
	top := proc.Path(t.root, "root") + m.Point
	var topSt unix.Stat_t
	if err := unix.Stat(top, &topSt); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(t.opts.ImagesDir, name))
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	err = filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(top, p)
		if st, ok := info.Sys().(*syscall.Stat_t); ok && st.Dev != topSt.Dev {
			if !d.IsDir() {
				// A file mounted on (a device bound from the host, as
				// a container in a user namespace has): an empty file
				// stays to mount it on again, with its permissions.
				h := &tar.Header{Typeflag: tar.TypeReg, Name: rel, Mode: int64(info.Mode().Perm()),
					Uid: int(st.Uid), Gid: int(st.Gid), ModTime: info.ModTime()}
				return tw.WriteHeader(h)
			}
			// Another mount: its mount point stays, empty (with the
			// mounted directory's attributes: the one below is hidden).
			h, err := tar.FileInfoHeader(info, "")
			if err != nil {
				return err
			}
			h.Name = rel + "/"
			if err := tw.WriteHeader(h); err != nil {
				return err
			}
			return filepath.SkipDir
		}
		link := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		h.Name = rel
		if d.IsDir() {
			h.Name += "/"
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			// Not following a symlink swapped in since the walk saw a
			// file (its target would be read from ferry's root).
			src, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW, 0)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, src)
			src.Close()
			return err
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}
