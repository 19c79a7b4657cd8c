package vmflags

import (
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// progLoadAttr is union bpf_attr for BPF_PROG_LOAD, up to attach_btf_obj_fd.
type progLoadAttr struct {
	progType, insnCnt        uint32
	insns, license           uint64
	logLevel, logSize        uint32
	logBuf                   uint64
	kernVersion, progFlags   uint32
	progName                 [16]byte
	progIfindex, attachType  uint32
	progBtfFd, funcInfoSize  uint32
	funcInfo                 uint64
	funcInfoCnt, lineInfoSz  uint32
	lineInfo                 uint64
	lineInfoCnt, attachBtfID uint32
	attachBtfObjFd, _        uint32
}

// linkCreateAttr is union bpf_attr for BPF_LINK_CREATE of an iterator.
type linkCreateAttr struct {
	progFd, targetFd, attachType, flags uint32
	iterInfo                            uint64
	iterInfoLen, _                      uint32
}

// iterLinkInfo is union bpf_iter_link_info (its task member; 16 bytes).
type iterLinkInfo struct {
	tid, pid, pidFd, _ uint32
}

func bpf(cmd uintptr, attr unsafe.Pointer, size uintptr) (int, error) {
	for {
		r, _, e := unix.Syscall(unix.SYS_BPF, cmd, uintptr(attr), size)
		if e == unix.EINTR || e == unix.EAGAIN {
			continue
		}
		if e != 0 {
			return -1, e
		}
		return int(r), nil
	}
}

func progLoad(insns []byte, btfID uint32, log []byte) (int, error) {
	license := []byte("GPL\x00")
	a := progLoadAttr{progType: progTypeTracing, insnCnt: uint32(len(insns) / 8),
		insns: uint64(uintptr(unsafe.Pointer(&insns[0]))), license: uint64(uintptr(unsafe.Pointer(&license[0]))),
		attachType: attachTraceIter, attachBtfID: btfID}
	copy(a.progName[:], "ferry_vmflags")
	if len(log) > 0 {
		a.logLevel, a.logSize, a.logBuf = 1, uint32(len(log)), uint64(uintptr(unsafe.Pointer(&log[0])))
	}
	fd, err := bpf(bpfProgLoad, unsafe.Pointer(&a), unsafe.Sizeof(a))
	runtime.KeepAlive(insns)
	runtime.KeepAlive(license)
	runtime.KeepAlive(log)
	if err != nil {
		return -1, os.NewSyscallError("bpf(BPF_PROG_LOAD)", err)
	}
	return fd, nil
}

func linkCreate(prog, pid int) (int, error) {
	info := iterLinkInfo{pid: uint32(pid)}
	a := linkCreateAttr{progFd: uint32(prog), attachType: attachTraceIter,
		iterInfo: uint64(uintptr(unsafe.Pointer(&info))), iterInfoLen: uint32(unsafe.Sizeof(info))}
	fd, err := bpf(bpfLinkCreate, unsafe.Pointer(&a), unsafe.Sizeof(a))
	runtime.KeepAlive(&info)
	if err != nil {
		return -1, os.NewSyscallError("bpf(BPF_LINK_CREATE)", err)
	}
	return fd, nil
}

func iterCreate(link int) (int, error) {
	a := struct{ linkFd, flags uint32 }{uint32(link), 0}
	fd, err := bpf(bpfIterCreate, unsafe.Pointer(&a), unsafe.Sizeof(a))
	if err != nil {
		return -1, os.NewSyscallError("bpf(BPF_ITER_CREATE)", err)
	}
	return fd, nil
}

func addrOf(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }

func mlock2(b []byte, flags int) error {
	_, _, e := unix.Syscall(unix.SYS_MLOCK2, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(flags))
	if e != 0 {
		return os.NewSyscallError("mlock2", e)
	}
	return nil
}
