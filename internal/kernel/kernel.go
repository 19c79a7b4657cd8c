package kernel

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Feature is one probed kernel mechanism.
type Feature struct {
	Name        string
	Description string
	MinKernel   string
	// Required features are needed by every dump and restore; the others
	// by pre-dump, lazy pages and other paths.
	Required bool
	probe    func(p *Probes) error
}

// Result is the outcome of one probe.
type Result struct {
	Feature
	Err error
}

// OK reports the feature is present.
func (r Result) OK() bool { return r.Err == nil }

var features = []Feature{
	{"ptrace-seize", "PTRACE_SEIZE and PTRACE_INTERRUPT: freeze without signals", "3.4", true, tracee("ptrace-seize")},
	{"ptrace-xstate", "PTRACE_GETREGSET NT_X86_XSTATE: FPU/SSE/AVX registers", "3.4", true, tracee("ptrace-xstate")},
	{"ptrace-sigmask", "PTRACE_GETSIGMASK/SETSIGMASK: blocked signals", "3.11", true, tracee("ptrace-sigmask")},
	{"ptrace-peeksiginfo", "PTRACE_PEEKSIGINFO: pending signals without dequeuing", "3.10", true, tracee("ptrace-peeksiginfo")},
	{"ptrace-rseq", "PTRACE_GET_RSEQ_CONFIGURATION: rseq registration", "5.13", false, tracee("ptrace-rseq")},
	{"process-vm-rw", "process_vm_readv/writev: bulk memory transfer", "3.2", true, tracee("process-vm-rw")},
	{"pidfd-getfd", "pidfd_open + pidfd_getfd: duplicate a target's fds", "5.6", true, tracee("pidfd-getfd")},
	{"kcmp", "kcmp(KCMP_FILE): shared open file descriptions", "3.5", true, tracee("kcmp")},
	{"clone3-set-tid", "clone3 with set_tid: recreate PIDs and TIDs", "5.5", true, plain(probeClone3)},
	{"prctl-mm-map", "prctl(PR_SET_MM, PR_SET_MM_MAP): mm fields, auxv, exe", "3.18", true, plain(probeMmMap)},
	{"memfd", "memfd_create: the restore seed", "3.17", true, plain(probeMemfd)},
	{"vdso", "a [vdso] mapping to move and run remote syscalls through", "2.6.18", true, plain(probeVdso)},
	{"timer-cr-ids", "PR_TIMER_CREATE_RESTORE_IDS: POSIX timers with their ids", "6.17", false, plain(probeTimerIDs)},
	{"userfaultfd", "userfaultfd with the UFFDIO_API handshake: lazy pages", "4.3", false, uffdFeature(0)},
	{"uffd-wp", "userfaultfd write-protect mode", "5.7", false, uffdFeature(uffdFeaturePagefaultFlagWP)},
	{"uffd-wp-async", "userfaultfd async write-protect: dirty tracking", "6.7", false, uffdFeature(uffdFeatureWPAsync)},
	{"pagemap-scan", "PAGEMAP_SCAN ioctl: read and re-arm dirty bits", "6.7", false, plain(probePagemapScan)},
	{"soft-dirty", "soft-dirty bits (/proc/PID/clear_refs 4): legacy dirty tracking", "3.11", false, plain(probeSoftDirty)},
}

// Probes runs and caches feature probes. The zero value is not usable:
// call New.
type Probes struct {
	mu      sync.Mutex
	results map[string]error
	done    map[string]bool
	// tracee probes share one child; its results fill several features.
	traceeOnce sync.Once
	tracee     map[string]error
}

// New returns an empty probe cache.
func New() *Probes {
	return &Probes{results: map[string]error{}, done: map[string]bool{}}
}

var defaultProbes = sync.OnceValue(New)

// Default returns the process-wide probe cache.
func Default() *Probes { return defaultProbes() }

// Features lists every known feature in check order.
func Features() []Feature { return append([]Feature(nil), features...) }

// Names lists the feature names.
func Names() []string {
	out := make([]string, len(features))
	for i, f := range features {
		out[i] = f.Name
	}
	return out
}

func plain(f func() error) func(*Probes) error { return func(*Probes) error { return f() } }

// ErrUnknown reports a feature name ferry does not know.
var ErrUnknown = errors.New("unknown kernel feature")

// Check probes one feature (once) and returns nil when it is present.
func (p *Probes) Check(name string) error {
	for _, f := range features {
		if f.Name == name {
			return p.run(f)
		}
	}
	return fmt.Errorf("%w %q (known: %v)", ErrUnknown, name, Names())
}

func (p *Probes) run(f Feature) error {
	p.mu.Lock()
	if p.done[f.Name] {
		err := p.results[f.Name]
		p.mu.Unlock()
		return err
	}
	p.mu.Unlock()
	err := f.probe(p)
	if err != nil {
		var fe *FeatureError
		if !errors.As(err, &fe) {
			err = &FeatureError{Name: f.Name, MinKernel: f.MinKernel, Running: Release(), Err: err}
		}
	}
	p.mu.Lock()
	p.done[f.Name], p.results[f.Name] = true, err
	p.mu.Unlock()
	return err
}

// All probes every feature (required ones first).
func (p *Probes) All() []Result {
	out := make([]Result, 0, len(features))
	for _, f := range features {
		out = append(out, Result{Feature: f, Err: p.run(f)})
	}
	return out
}

// Release returns the running kernel's release string.
func Release() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// missing wraps an errno that means "this kernel lacks it".
func missing(what string, err error) error {
	return fmt.Errorf("%s: %w (%w)", what, ErrNotSupported, err)
}

func isMissing(err error) bool {
	return errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EIO) || errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EOPNOTSUPP)
}

func probeClone3() error {
	// set_tid_size > 0 with set_tid NULL: EINVAL on kernels that know
	// set_tid (5.5+), E2BIG before, ENOSYS without clone3. Never forks.
	err := clone3Invalid()
	switch {
	case errors.Is(err, unix.EINVAL):
		return nil
	case errors.Is(err, unix.E2BIG), errors.Is(err, unix.ENOSYS):
		return missing("clone3 set_tid", err)
	case err == nil:
		return errors.New("clone3 accepted invalid arguments")
	}
	return err
}

func probeMmMap() error {
	size, err := mmMapSize()
	if err != nil {
		if isMissing(err) {
			return missing("prctl(PR_SET_MM_MAP_SIZE)", err)
		}
		return err
	}
	if size != 104 {
		return fmt.Errorf("struct prctl_mm_map is %d bytes here, ferry knows 104", size)
	}
	return nil
}

func probeMemfd() error {
	fd, err := unix.MemfdCreate("ferry-check", unix.MFD_CLOEXEC)
	if err != nil {
		return missing("memfd_create", err)
	}
	return unix.Close(fd)
}

func probeVdso() error {
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return err
	}
	if !bytes.Contains(b, []byte("[vdso]")) {
		return missing("no [vdso] in /proc/self/maps (booted with vdso=0?)", unix.ENOENT)
	}
	return nil
}

// PR_TIMER_CREATE_RESTORE_IDS (include/uapi/linux/prctl.h, 6.17).
const (
	prTimerCreateRestoreIDs    = 77
	prTimerCreateRestoreIDsGet = 2
)

func probeTimerIDs() error {
	_, err := unix.PrctlRetInt(prTimerCreateRestoreIDs, prTimerCreateRestoreIDsGet, 0, 0, 0)
	if err != nil {
		if isMissing(err) {
			return missing("prctl(PR_TIMER_CREATE_RESTORE_IDS)", err)
		}
		return err
	}
	return nil
}

func probeSoftDirty() error {
	return softDirty()
}

// userfaultfd features (include/uapi/linux/userfaultfd.h).
const (
	uffdAPI                    = 0xAA
	uffdFeaturePagefaultFlagWP = 1 << 0
	uffdFeatureWPAsync         = 1 << 15
	uffdUserModeOnly           = 1
)

func uffdFeature(bit uint64) func(*Probes) error {
	return func(*Probes) error {
		got, err := uffdAPIFeatures()
		if err != nil {
			if isMissing(err) || errors.Is(err, unix.EPERM) {
				return missing("userfaultfd", err)
			}
			return err
		}
		if got&bit != bit {
			return missing(fmt.Sprintf("userfaultfd feature %#x", bit), unix.EOPNOTSUPP)
		}
		return nil
	}
}
