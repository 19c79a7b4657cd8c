package vmflags

import (
	"os"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/uffd"
)

// probe makes one mapping in ferry with a known flag set; an error means
// this kernel cannot make it (the flag is then not learned: a VMA that
// has it is read from smaps).
type probe func() ([]byte, error)

func anon(prot, flags int) ([]byte, error) {
	return unix.Mmap(-1, 0, 2*os.Getpagesize(), prot, flags|unix.MAP_ANONYMOUS)
}

func advised(advice int) probe {
	return func() ([]byte, error) {
		b, err := anon(unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
		if err != nil {
			return nil, err
		}
		return b, unix.Madvise(b, advice)
	}
}

func mapped(prot, flags int) probe {
	return func() ([]byte, error) { return anon(prot, flags) }
}

func locked(flags int) probe {
	return func() ([]byte, error) {
		b, err := anon(unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
		if err != nil {
			return nil, err
		}
		return b, mlock2(b, flags)
	}
}

// registered registers a probe with u in mode (shared memory for minor
// faults, which anonymous memory does not have).
func registered(u *uffd.FD, mode uint64) probe {
	return func() ([]byte, error) {
		if u == nil {
			return nil, unix.ENOSYS
		}
		flags := unix.MAP_PRIVATE
		if mode == uffd.RegisterMinor {
			flags = unix.MAP_SHARED
		}
		b, err := anon(unix.PROT_READ|unix.PROT_WRITE, flags)
		if err != nil {
			return nil, err
		}
		_, err = u.Register(addrOf(b), uint64(len(b)), mode)
		return b, err
	}
}

// calibrate makes the probes, reads ferry's own VMAs with the iterator,
// then smaps, then the iterator again, and learns each bit's name from the
// VMAs the two iterator reads agree on (a VMA of the Go runtime may
// change meanwhile; the probes do not). The vsyscall page's flags come
// from smaps as they are.
func calibrate(it *iterator) (names, []string, error) {
	var n names
	u, err := uffd.Open(uffd.FeatureMinorShmem)
	if err != nil {
		u, _ = uffd.Open(0)
	}
	if u != nil {
		defer u.Close()
	}
	rw := unix.PROT_READ | unix.PROT_WRITE
	probes := []probe{
		mapped(rw, unix.MAP_PRIVATE),
		mapped(rw|unix.PROT_EXEC, unix.MAP_PRIVATE),
		mapped(rw, unix.MAP_SHARED),
		mapped(rw, unix.MAP_PRIVATE|unix.MAP_GROWSDOWN),
		mapped(rw, unix.MAP_PRIVATE|unix.MAP_NORESERVE),
		mapped(rw, unix.MAP_DROPPABLE),
		advised(unix.MADV_DONTFORK),
		advised(unix.MADV_DONTDUMP),
		advised(unix.MADV_WIPEONFORK),
		advised(unix.MADV_HUGEPAGE),
		advised(unix.MADV_NOHUGEPAGE),
		advised(unix.MADV_MERGEABLE),
		advised(unix.MADV_SEQUENTIAL),
		advised(unix.MADV_RANDOM),
		locked(0),
		locked(unix.MLOCK_ONFAULT),
		registered(u, uffd.RegisterMissing),
		registered(u, uffd.RegisterWP),
		registered(u, uffd.RegisterMinor),
	}
	var maps [][]byte
	defer func() {
		for _, b := range maps {
			unix.Munmap(b)
		}
	}()
	for _, p := range probes {
		if b, err := p(); b != nil {
			if err != nil {
				unix.Munmap(b)
				continue
			}
			maps = append(maps, b)
		}
	}
	// A sealed mapping cannot be unmapped: one page stays in ferry.
	if b, err := anon(unix.PROT_READ, unix.MAP_PRIVATE); err == nil {
		unix.Mseal(b, 0)
	}
	self := os.Getpid()
	before, err := it.read(self)
	if err != nil {
		return n, nil, err
	}
	smaps, err := proc.ReadSmaps(self)
	if err != nil {
		return n, nil, err
	}
	after, err := it.read(self)
	if err != nil {
		return n, nil, err
	}
	stable := map[record]bool{}
	for _, r := range before {
		stable[r] = true
	}
	byStart := map[uint64]record{}
	for _, r := range after {
		if stable[r] {
			byStart[r.start] = r
		}
	}
	var gate []string
	for _, v := range smaps {
		if v.Name == gateName {
			gate = v.VmFlags
			continue
		}
		if r, ok := byStart[v.Start]; ok && r.end == v.End {
			if err := n.learn(r.flags, v.VmFlags); err != nil {
				return n, nil, err
			}
		}
	}
	return n, gate, nil
}
