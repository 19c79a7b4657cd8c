package uffd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrNotSupported reports a userfaultfd feature this kernel lacks.
var ErrNotSupported = errors.New("userfaultfd feature not supported by this kernel")

// FD is a userfaultfd after its API handshake.
type FD struct {
	mu       sync.Mutex
	fd       int // -1 once closed
	features uint64
}

// Open creates a userfaultfd for the calling process (non-blocking,
// close-on-exec) and performs the API handshake asking for features. It
// falls back to UFFD_USER_MODE_ONLY when full mode is refused.
func Open(features uint64) (*FD, error) {
	fd, err := sysUserfaultfd(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if errors.Is(err, unix.EPERM) {
		fd, err = sysUserfaultfd(unix.O_CLOEXEC | unix.O_NONBLOCK | UserModeOnly)
	}
	if err != nil {
		return nil, os.NewSyscallError("userfaultfd", err)
	}
	u, err := Adopt(fd, features)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	return u, nil
}

// Adopt takes ownership of fd, a userfaultfd that has not had its API
// handshake (e.g. one created inside another process by a remote syscall
// and taken with pidfd_getfd), and performs the handshake.
func Adopt(fd int, features uint64) (*FD, error) {
	a := apiArgs{API: API, Features: features}
	if err := ioctl(fd, ioctlAPI, ptrOf(&a)); err != nil {
		if errors.Is(err, unix.EINVAL) && features != 0 {
			return nil, fmt.Errorf("UFFDIO_API with features %#x: %w (%v)", features, ErrNotSupported, err)
		}
		return nil, os.NewSyscallError("ioctl(UFFDIO_API)", err)
	}
	return &FD{fd: fd, features: a.Features}, nil
}

// AdoptNoHandshake takes ownership of a userfaultfd whose handshake was
// already done (e.g. inside the target process), with the features it got.
func AdoptNoHandshake(fd int, features uint64) *FD { return &FD{fd: fd, features: features} }

// Supported returns the features the kernel offers, probed on a throwaway
// userfaultfd.
func Supported() (uint64, error) {
	u, err := Open(0)
	if err != nil {
		return 0, err
	}
	defer u.Close()
	return u.features, nil
}

// Features returns what the handshake granted.
func (u *FD) Features() uint64 { return u.features }

// Fd returns the descriptor for polling; it stays owned by u.
func (u *FD) Fd() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.fd
}

// Close closes the descriptor (unregistering every range); idempotent.
func (u *FD) Close() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.fd < 0 {
		return nil
	}
	err := unix.Close(u.fd)
	u.fd = -1
	return err
}

// Register registers [start, start+length) in mode (RegisterMissing,
// RegisterWP, ...) and returns the ioctls allowed on it.
func (u *FD) Register(start, length, mode uint64) (uint64, error) {
	r := registerArgs{Range: Range{start, length}, Mode: mode}
	if err := ioctl(u.fd, ioctlRegister, ptrOf(&r)); err != nil {
		return 0, fmt.Errorf("UFFDIO_REGISTER %#x+%#x mode %d: %w", start, length, mode, os.NewSyscallError("ioctl", err))
	}
	return r.Ioctls, nil
}

// Unregister unregisters a range.
func (u *FD) Unregister(start, length uint64) error {
	r := Range{start, length}
	if err := ioctl(u.fd, ioctlUnregister, ptrOf(&r)); err != nil {
		return fmt.Errorf("UFFDIO_UNREGISTER %#x+%#x: %w", start, length, os.NewSyscallError("ioctl", err))
	}
	return nil
}

// Wake wakes threads waiting on faults in a range.
func (u *FD) Wake(start, length uint64) error {
	r := Range{start, length}
	if err := ioctl(u.fd, ioctlWake, ptrOf(&r)); err != nil {
		return fmt.Errorf("UFFDIO_WAKE %#x+%#x: %w", start, length, os.NewSyscallError("ioctl", err))
	}
	return nil
}

// ErrExist reports a UFFDIO_COPY or ZEROPAGE onto a page that is already
// populated (another fault or copy got there first).
var ErrExist = unix.EEXIST

// Copy atomically fills [dst, dst+len(src)) of the registered process
// with src and wakes its faulting threads (unless dontWake). It returns
// the bytes copied; a partial copy returns n < len(src) with the error.
func (u *FD) Copy(dst uint64, src []byte, dontWake bool) (int, error) {
	if len(src) == 0 {
		return 0, nil
	}
	c := copyArgs{Dst: dst, Src: uint64(addrOf(src)), Len: uint64(len(src))}
	if dontWake {
		c.Mode = copyModeDontWake
	}
	err := ioctlKeep(u.fd, ioctlCopy, ptrOf(&c))
	n := 0
	if c.Copy > 0 {
		n = int(c.Copy)
	}
	if err != nil {
		return n, fmt.Errorf("UFFDIO_COPY %#x+%#x: %w", dst, len(src), os.NewSyscallError("ioctl", err))
	}
	return n, nil
}

// ZeroPage maps zero pages over [start, start+length) and wakes waiters.
func (u *FD) ZeroPage(start, length uint64) error {
	z := zeropageArgs{Range: Range{start, length}}
	if err := ioctlKeep(u.fd, ioctlZeropage, ptrOf(&z)); err != nil {
		return fmt.Errorf("UFFDIO_ZEROPAGE %#x+%#x: %w", start, length, os.NewSyscallError("ioctl", err))
	}
	return nil
}

// WriteProtect sets (protect) or clears write protection on a range
// registered in RegisterWP mode.
func (u *FD) WriteProtect(start, length uint64, protect bool) error {
	w := writeprotectArgs{Range: Range{start, length}}
	if protect {
		w.Mode = wpModeWP
	}
	if err := ioctl(u.fd, ioctlWriteprotect, ptrOf(&w)); err != nil {
		return fmt.Errorf("UFFDIO_WRITEPROTECT %#x+%#x: %w", start, length, os.NewSyscallError("ioctl", err))
	}
	return nil
}

// Msg is a decoded struct uffd_msg.
type Msg struct {
	Event uint8
	// Pagefault
	Flags   uint64
	Address uint64
	Tid     uint32
	// Fork: the child's new userfaultfd (owned by the reader now).
	ChildFd int
	// Remap
	From, To, Len uint64
	// Remove, Unmap: [Start, End)
	Start, End uint64
}

func (m Msg) String() string {
	switch m.Event {
	case EventPagefault:
		return fmt.Sprintf("pagefault at %#x flags %#x tid %d", m.Address, m.Flags, m.Tid)
	case EventFork:
		return fmt.Sprintf("fork: child uffd %d", m.ChildFd)
	case EventRemap:
		return fmt.Sprintf("remap %#x -> %#x len %#x", m.From, m.To, m.Len)
	case EventRemove:
		return fmt.Sprintf("remove %#x-%#x", m.Start, m.End)
	case EventUnmap:
		return fmt.Sprintf("unmap %#x-%#x", m.Start, m.End)
	}
	return fmt.Sprintf("event %#x", m.Event)
}

// DecodeMsg parses one struct uffd_msg.
func DecodeMsg(b []byte) (Msg, error) {
	if len(b) < MsgSize {
		return Msg{}, fmt.Errorf("uffd_msg of %d bytes, want %d", len(b), MsgSize)
	}
	le := binary.LittleEndian
	m := Msg{Event: b[0]}
	arg := b[8:]
	switch m.Event {
	case EventPagefault:
		m.Flags, m.Address, m.Tid = le.Uint64(arg), le.Uint64(arg[8:]), le.Uint32(arg[16:])
	case EventFork:
		m.ChildFd = int(le.Uint32(arg))
	case EventRemap:
		m.From, m.To, m.Len = le.Uint64(arg), le.Uint64(arg[8:]), le.Uint64(arg[16:])
	case EventRemove, EventUnmap:
		m.Start, m.End = le.Uint64(arg), le.Uint64(arg[8:])
	default:
		return m, fmt.Errorf("unknown userfaultfd event %#x", m.Event)
	}
	return m, nil
}

// ReadMsgs reads the pending messages without blocking; it returns none
// (and no error) when nothing is pending.
func (u *FD) ReadMsgs(buf []byte) ([]Msg, error) {
	if len(buf) < MsgSize {
		buf = make([]byte, 16*MsgSize)
	}
	var n int
	var err error
	for {
		n, err = unix.Read(u.fd, buf)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if errors.Is(err, unix.EAGAIN) {
		return nil, nil
	}
	if err != nil {
		return nil, os.NewSyscallError("read userfaultfd", err)
	}
	var out []Msg
	for off := 0; off+MsgSize <= n; off += MsgSize {
		m, err := DecodeMsg(buf[off : off+MsgSize])
		if err != nil {
			return out, err
		}
		out = append(out, m)
	}
	return out, nil
}
