package ptrace

import (
	"errors"
	"fmt"
	"slices"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Requests and note types not in x/sys/unix (include/uapi/linux/ptrace.h,
// include/uapi/linux/elf.h).
const (
	reqGetRegset      = 0x4204
	reqSetRegset      = 0x4205
	reqPeekSiginfo    = 0x4209
	reqGetSigmask     = 0x420a
	reqSetSigmask     = 0x420b
	reqGetRseqConfig  = 0x420f
	peekSiginfoShared = 1
	ntX86Xstate       = 0x202
	ntPrfpreg         = 2
	maxXstate         = 1 << 16
	siginfoSize       = 128
)

func rawPtrace(req, tid int, addr, data uintptr) error {
	_, _, e := unix.Syscall6(unix.SYS_PTRACE, uintptr(req), uintptr(tid), addr, data, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// GetXstate returns the XSAVE area (NT_X86_XSTATE) of tid, sized as the
// kernel reports it.
func GetXstate(tid int) ([]byte, error) {
	buf := make([]byte, maxXstate)
	iov := unix.Iovec{Base: &buf[0], Len: uint64(len(buf))}
	err := retry(func() error { return rawPtrace(reqGetRegset, tid, ntX86Xstate, uintptr(unsafe.Pointer(&iov))) })
	if err != nil {
		return nil, wrap("ptrace(GETREGSET NT_X86_XSTATE)", err)
	}
	return buf[:iov.Len], nil
}

// SetXstate writes the XSAVE area; buf must be the full size GetXstate
// returned or the kernel drops the write.
func SetXstate(tid int, buf []byte) error {
	if len(buf) == 0 {
		return nil
	}
	iov := unix.Iovec{Base: &buf[0], Len: uint64(len(buf))}
	err := retry(func() error { return rawPtrace(reqSetRegset, tid, ntX86Xstate, uintptr(unsafe.Pointer(&iov))) })
	return wrap("ptrace(SETREGSET NT_X86_XSTATE)", err)
}

// GetSigmask returns the blocked-signal mask of tid.
func GetSigmask(tid int) (uint64, error) {
	var m uint64
	err := retry(func() error { return rawPtrace(reqGetSigmask, tid, 8, uintptr(unsafe.Pointer(&m))) })
	return m, wrap("ptrace(GETSIGMASK)", err)
}

// SetSigmask sets the blocked-signal mask of tid.
func SetSigmask(tid int, m uint64) error {
	err := retry(func() error { return rawPtrace(reqSetSigmask, tid, 8, uintptr(unsafe.Pointer(&m))) })
	return wrap("ptrace(SETSIGMASK)", err)
}

type peekArgs struct {
	off   uint64
	flags uint32
	nr    int32
}

// PeekSiginfo returns the queued signals of tid, thread-private or (shared)
// process-wide, as raw 128-byte siginfo_t records, without dequeuing them.
func PeekSiginfo(tid int, shared bool) ([][]byte, error) {
	var out [][]byte
	buf := make([]byte, siginfoSize*32)
	for {
		a := peekArgs{off: uint64(len(out)), nr: 32}
		if shared {
			a.flags = peekSiginfoShared
		}
		var n uintptr
		err := retry(func() error {
			r, _, e := unix.Syscall6(unix.SYS_PTRACE, reqPeekSiginfo, uintptr(tid),
				uintptr(unsafe.Pointer(&a)), uintptr(unsafe.Pointer(&buf[0])), 0, 0)
			if e != 0 {
				return e
			}
			n = r
			return nil
		})
		if err != nil {
			return nil, wrap("ptrace(PEEKSIGINFO)", err)
		}
		if n == 0 {
			return out, nil
		}
		for i := 0; i < int(n); i++ {
			out = append(out, append([]byte(nil), buf[i*siginfoSize:(i+1)*siginfoSize]...))
		}
	}
}

// RseqConfig mirrors struct ptrace_rseq_configuration.
type RseqConfig struct {
	Ptr       uint64
	Size      uint32
	Signature uint32
	Flags     uint32
	_         uint32
}

// GetRseqConfig returns the rseq registration of tid (Ptr 0 when none).
func GetRseqConfig(tid int) (RseqConfig, error) {
	var c RseqConfig
	err := retry(func() error {
		return rawPtrace(reqGetRseqConfig, tid, unsafe.Sizeof(c), uintptr(unsafe.Pointer(&c)))
	})
	return c, wrap("ptrace(GET_RSEQ_CONFIGURATION)", err)
}

// GetRobustList returns the robust futex list head and length of tid.
func GetRobustList(tid int) (head uint64, size uint64, err error) {
	err = retry(func() error {
		_, _, e := unix.Syscall(unix.SYS_GET_ROBUST_LIST, uintptr(tid),
			uintptr(unsafe.Pointer(&head)), uintptr(unsafe.Pointer(&size)))
		if e != 0 {
			return e
		}
		return nil
	})
	return head, size, wrap("get_robust_list", err)
}

const (
	reqSeccompGetFilter   = 0x420c // PTRACE_SECCOMP_GET_FILTER
	reqSeccompGetMetadata = 0x420d // PTRACE_SECCOMP_GET_METADATA
	// SeccompFilterLog is SECCOMP_FILTER_FLAG_LOG, the one flag of a
	// filter the kernel reports.
	SeccompFilterLog = 2
)

// SeccompFilter is one seccomp filter of a thread: its classic BPF program
// (struct sock_filter, 8 bytes an instruction) and the flags the kernel
// reports for it.
type SeccompFilter struct {
	Prog  []byte
	Flags uint64
}

// SeccompFilters returns the seccomp filters of the stopped tracee tid,
// oldest first (the kernel numbers them from the newest). Reading them
// takes CAP_SYS_ADMIN.
func SeccompFilters(tid int) ([]SeccompFilter, error) {
	var out []SeccompFilter
	for i := 0; ; i++ {
		var n uintptr
		err := retry(func() error {
			r, _, e := unix.Syscall6(unix.SYS_PTRACE, reqSeccompGetFilter, uintptr(tid), uintptr(i), 0, 0, 0)
			if e != 0 {
				return e
			}
			n = r
			return nil
		})
		if errors.Is(err, unix.ENOENT) {
			break // past the oldest
		}
		if err != nil {
			return nil, wrap("ptrace(SECCOMP_GET_FILTER)", err)
		}
		prog := make([]byte, 8*n)
		if n > 0 {
			err = retry(func() error {
				r, _, e := unix.Syscall6(unix.SYS_PTRACE, reqSeccompGetFilter, uintptr(tid), uintptr(i), uintptr(unsafe.Pointer(&prog[0])), 0, 0)
				if e != 0 {
					return e
				}
				if r != n {
					return fmt.Errorf("filter %d changed size (%d, then %d instructions)", i, n, r)
				}
				return nil
			})
			if err != nil {
				return nil, wrap("ptrace(SECCOMP_GET_FILTER)", err)
			}
		}
		meta := struct{ FilterOff, Flags uint64 }{FilterOff: uint64(i)}
		err = retry(func() error {
			return rawPtrace(reqSeccompGetMetadata, tid, unsafe.Sizeof(meta), uintptr(unsafe.Pointer(&meta)))
		})
		if err != nil {
			return nil, wrap("ptrace(SECCOMP_GET_METADATA)", err)
		}
		out = append(out, SeccompFilter{Prog: prog, Flags: meta.Flags})
	}
	slices.Reverse(out)
	return out, nil
}
