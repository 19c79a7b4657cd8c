package sysvipc

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// msgCopy copies message index of queue id into buf (type, then data)
// without taking it off the queue, and returns the data's length.
func msgCopy(id int, buf []byte, index int) (int, error) {
	n, _, errno := unix.Syscall6(unix.SYS_MSGRCV, uintptr(id), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)-8),
		uintptr(index), uintptr(unix.IPC_NOWAIT|msgCopyFl), 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// msgSend queues one message of type typ.
func msgSend(id int, typ int64, data []byte) error {
	buf := make([]byte, 8+len(data))
	*(*int64)(unsafe.Pointer(&buf[0])) = typ
	copy(buf[8:], data)
	_, _, errno := unix.Syscall6(unix.SYS_MSGSND, uintptr(id), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(data)), uintptr(unix.IPC_NOWAIT), 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

func semctlAll(id, cmd int, vals []uint16) error {
	_, _, errno := unix.Syscall6(unix.SYS_SEMCTL, uintptr(id), 0, uintptr(cmd), uintptr(unsafe.Pointer(&vals[0])), 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

func msgget(key int32, flags int) (int, error) {
	id, _, errno := unix.Syscall(unix.SYS_MSGGET, uintptr(key), uintptr(flags), 0)
	if errno != 0 {
		return 0, errno
	}
	return int(id), nil
}

func semget(key int32, n, flags int) (int, error) {
	id, _, errno := unix.Syscall(unix.SYS_SEMGET, uintptr(key), uintptr(n), uintptr(flags))
	if errno != 0 {
		return 0, errno
	}
	return int(id), nil
}

// ipcPerm is struct ipc64_perm (include/uapi/asm-generic/ipcbuf.h).
type ipcPerm struct {
	Key                  int32
	Uid, Gid, Cuid, Cgid uint32
	Mode                 uint32
	Seq                  uint16
	_                    uint16
	_                    [2]uint64
}

// setOwner sets the owner and mode of object id (IPC_STAT, then IPC_SET
// of the ipc64_perm at the start of msqid64_ds / semid64_ds / shmid64_ds,
// which 64-bit x86 always uses: no IPC_64 flag there).
func setOwner(kind string, id int, uid, gid, mode uint32) error {
	var buf [256]byte // larger than any *id64_ds
	nr := map[string]uintptr{"shm": unix.SYS_SHMCTL, "msg": unix.SYS_MSGCTL, "sem": unix.SYS_SEMCTL}[kind]
	ctl := func(cmd int) error {
		var errno unix.Errno
		if kind == "sem" {
			_, _, errno = unix.Syscall6(nr, uintptr(id), 0, uintptr(cmd), uintptr(unsafe.Pointer(&buf[0])), 0, 0)
		} else {
			_, _, errno = unix.Syscall(nr, uintptr(id), uintptr(cmd), uintptr(unsafe.Pointer(&buf[0])))
		}
		if errno != 0 {
			return errno
		}
		return nil
	}
	if err := ctl(unix.IPC_STAT); err != nil {
		return fmt.Errorf("%s %d: IPC_STAT: %w", kind, id, err)
	}
	p := (*ipcPerm)(unsafe.Pointer(&buf[0]))
	p.Uid, p.Gid, p.Mode = uid, gid, mode
	if err := ctl(unix.IPC_SET); err != nil {
		return fmt.Errorf("%s %d: IPC_SET: %w", kind, id, err)
	}
	return nil
}

func ctlRmid(kind string, id int) error {
	var errno unix.Errno
	switch kind {
	case "msg":
		_, _, errno = unix.Syscall(unix.SYS_MSGCTL, uintptr(id), uintptr(unix.IPC_RMID), 0)
	case "sem":
		_, _, errno = unix.Syscall6(unix.SYS_SEMCTL, uintptr(id), 0, uintptr(unix.IPC_RMID), 0, 0, 0)
	default:
		return fmt.Errorf("sysvipc: no kind %q", kind)
	}
	if errno != 0 {
		return errno
	}
	return nil
}

var _ = [1]struct{}{}[unsafe.Sizeof(ipcPerm{})-48]
