package vmflags

import (
	"fmt"
	"io"
	"os"
	"slices"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/proc"
)

// BTFPath is the running kernel's BTF.
const BTFPath = "/sys/kernel/btf/vmlinux"

// gateName is the vsyscall page: maps shows it, but it is no VMA of the
// process (the iterator does not see it); its flags are the same in every
// process.
const gateName = "[vsyscall]"

var state struct {
	once  sync.Once
	err   error // why the iterator is not used
	it    *iterator
	names names
	gate  []string // the vsyscall page's flags (nil: no such page)
}

// Prepare loads the iterator and learns the names of the flags, once per
// process (a dump calls it early, in the background); later calls return
// what the first found. An error says why Read uses smaps.
func Prepare() error {
	state.once.Do(func() {
		state.err = prepare()
		if state.err != nil {
			state.err = fmt.Errorf("VMA flags from smaps: %w", state.err)
		}
	})
	return state.err
}

func prepare() error {
	boot := bootID()
	if c, err := readCache(CacheFile, boot); err == nil {
		if it, err := loadIterator(c.kernelInfo()); err == nil {
			state.it, state.names, state.gate = it, c.names(), c.Gate
			return nil
		}
	}
	ki, it, n, gate, err := learnAll()
	if err != nil {
		return err
	}
	state.it, state.names, state.gate = it, n, gate
	if boot != "" {
		writeCache(CacheFile, newCache(boot, ki, n, gate)) // best effort
	}
	return nil
}

// learnAll finds what the iterator needs in the kernel's BTF, loads it
// and learns the flags' names.
func learnAll() (kernelInfo, *iterator, names, []string, error) {
	b, release, err := readBTF()
	if err != nil {
		return kernelInfo{}, nil, names{}, nil, err
	}
	ki, err := kernelInfoFrom(b)
	release()
	if err != nil {
		return ki, nil, names{}, nil, fmt.Errorf("%s: %w", BTFPath, err)
	}
	it, err := loadIterator(ki)
	if err != nil {
		return ki, nil, names{}, nil, fmt.Errorf("task_vma iterator: %w", err)
	}
	n, gate, err := calibrate(it)
	if err != nil {
		return ki, nil, names{}, nil, fmt.Errorf("learning the flags' names: %w", err)
	}
	return ki, it, n, gate, nil
}

// readBTF maps the kernel's BTF (5 MB; reading it costs ~8 ms, mapping
// it, where the kernel allows (6.15), nothing).
func readBTF() ([]byte, func(), error) {
	f, err := os.Open(BTFPath)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	if b, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_PRIVATE); err == nil {
		return b, func() { unix.Munmap(b) }, nil
	}
	b, err := io.ReadAll(f)
	return b, func() {}, err
}

// Source says where Read takes the flags from on this machine, for
// "ferry check".
func Source() string {
	if err := Prepare(); err != nil {
		return err.Error()
	}
	return fmt.Sprintf("BPF task_vma iterator (%d flags named)", len(learned()))
}

func learned() []string {
	var out []string
	for b := range 64 {
		if state.names.known&(1<<b) != 0 {
			out = append(out, state.names.name[b])
		}
	}
	return out
}

// Read returns pid's VMAs with their flags: what /proc/PID/smaps shows of
// them, without its walk of every page table when the iterator can tell.
// A process whose VMAs change under the read (it runs), or with a flag
// not learned, is read from smaps.
func Read(pid int) ([]proc.Vma, error) {
	if Prepare() != nil {
		return proc.ReadSmaps(pid)
	}
	for range 2 {
		vmas, err := proc.ReadMaps(pid)
		if err != nil {
			return nil, err
		}
		recs, err := state.it.read(pid)
		if err != nil {
			break
		}
		switch fill(vmas, recs) {
		case filled:
			return vmas, nil
		case unknownFlag:
			return proc.ReadSmaps(pid)
		}
	}
	return proc.ReadSmaps(pid)
}

type fillResult int

const (
	filled fillResult = iota
	moved             // maps and the iterator saw different VMAs
	unknownFlag
)

// fill sets the VmFlags of vmas (from maps) from the iterator's records.
func fill(vmas []proc.Vma, recs []record) fillResult {
	j := 0
	for i := range vmas {
		v := &vmas[i]
		if v.Name == gateName && state.gate != nil && (j == len(recs) || recs[j].start != v.Start) {
			v.VmFlags = slices.Clone(state.gate)
			continue
		}
		if j == len(recs) || recs[j].start != v.Start || recs[j].end != v.End {
			return moved
		}
		f, ok := state.names.flags(recs[j].flags)
		if !ok {
			return unknownFlag
		}
		v.VmFlags = f
		j++
	}
	if j != len(recs) {
		return moved
	}
	return filled
}
