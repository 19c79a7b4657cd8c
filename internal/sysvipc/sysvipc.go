package sysvipc

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Object is one line of /proc/sysvipc/shm, msg or sem.
type Object struct {
	Key      int32
	ID       int
	Mode     uint32 // permission bits and flags (SHM_DEST: removed)
	Uid, Gid uint32
	// Size: a segment's bytes, a queue's bytes, a set's semaphores.
	Size uint64
	// Count: a queue's messages.
	Count int
}

// ShmDest marks a shared memory segment removed while attached.
const ShmDest = 0o1000

// List reads /proc/sysvipc/KIND (shm, msg or sem) for the calling
// thread's IPC namespace.
func List(kind string) ([]Object, error) {
	name := "/proc/sysvipc/" + kind
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	return parse(name, kind, b)
}

func parse(name, kind string, b []byte) ([]Object, error) {
	// Columns: key id perms, then per kind.
	var sizeCol, countCol, uidCol int
	switch kind {
	case "shm":
		sizeCol, countCol, uidCol = 3, -1, 7
	case "msg":
		sizeCol, countCol, uidCol = 3, 4, 7
	case "sem":
		sizeCol, countCol, uidCol = 3, -1, 4
	default:
		return nil, fmt.Errorf("sysvipc: no kind %q", kind)
	}
	var out []Object
	var err error
	sc := bufio.NewScanner(bytes.NewReader(b))
	for ln := 1; sc.Scan(); ln++ {
		f := strings.Fields(sc.Text())
		if ln == 1 {
			continue // the header
		}
		if len(f) <= uidCol+1 {
			return nil, fmt.Errorf("%s:%d: %d fields", name, ln, len(f))
		}
		num := func(i, base int) uint64 {
			x, e := strconv.ParseUint(f[i], base, 64)
			if e != nil && err == nil {
				err = fmt.Errorf("%s:%d: field %d %q: %w", name, ln, i+1, f[i], e)
			}
			return x
		}
		key, e := strconv.ParseInt(f[0], 10, 32)
		if e != nil {
			return nil, fmt.Errorf("%s:%d: key %q: %w", name, ln, f[0], e)
		}
		o := Object{Key: int32(key), ID: int(num(1, 10)), Mode: uint32(num(2, 8)), Size: num(sizeCol, 10),
			Uid: uint32(num(uidCol, 10)), Gid: uint32(num(uidCol+1, 10))}
		if countCol >= 0 {
			o.Count = int(num(countCol, 10))
		}
		out = append(out, o)
	}
	if err == nil {
		err = sc.Err()
	}
	return out, err
}

// SetNextID makes the next object of kind (shm, msg, sem) created in the
// calling thread's IPC namespace get id.
func SetNextID(kind string, id int) error {
	return os.WriteFile("/proc/sys/kernel/"+kind+"_next_id", []byte(strconv.Itoa(id)), 0)
}

// ReadShm copies the contents of segment id.
func ReadShm(id int, size uint64) ([]byte, error) {
	m, err := unix.SysvShmAttach(id, 0, unix.SHM_RDONLY)
	if err != nil {
		return nil, fmt.Errorf("shmat %d: %w", id, err)
	}
	defer unix.SysvShmDetach(m)
	return append([]byte(nil), m[:min(uint64(len(m)), size)]...), nil
}

// WriteShm writes data at the start of segment id.
func WriteShm(id int, data []byte) error {
	m, err := unix.SysvShmAttach(id, 0, 0)
	if err != nil {
		return fmt.Errorf("shmat %d: %w", id, err)
	}
	defer unix.SysvShmDetach(m)
	copy(m, data)
	return nil
}

// Message is one message of a queue.
type Message struct {
	Type int64
	Data []byte
}

// ReadQueue copies the count messages of queue id (msgrcv MSG_COPY: they
// stay queued), each at most max bytes.
func ReadQueue(id, count int, max uint64) ([]Message, error) {
	buf := make([]byte, 8+max)
	var out []Message
	for i := 0; i < count; i++ {
		n, err := msgCopy(id, buf, i)
		if err != nil {
			if errors.Is(err, unix.ENOSYS) {
				return nil, fmt.Errorf("queue %d: msgrcv MSG_COPY: %w (a kernel without CONFIG_CHECKPOINT_RESTORE)", id, err)
			}
			return nil, fmt.Errorf("queue %d, message %d: %w", id, i, err)
		}
		out = append(out, Message{Type: int64(le64(buf)), Data: append([]byte(nil), buf[8:8+n]...)})
	}
	return out, nil
}

// WriteQueue sends msgs to queue id, in order.
func WriteQueue(id int, msgs []Message) error {
	for i, m := range msgs {
		if err := msgSend(id, m.Type, m.Data); err != nil {
			return fmt.Errorf("queue %d, message %d: %w", id, i, err)
		}
	}
	return nil
}

func le64(b []byte) uint64 { return binary.LittleEndian.Uint64(b) }

// ReadSems returns the values of the n semaphores of set id.
func ReadSems(id, n int) ([]uint16, error) {
	vals := make([]uint16, n)
	if n > 0 {
		if err := semctlAll(id, semGetAll, vals); err != nil {
			return nil, fmt.Errorf("semaphore set %d: GETALL: %w", id, err)
		}
	}
	return vals, nil
}

// WriteSems sets the values of the semaphores of set id.
func WriteSems(id int, vals []uint16) error {
	if len(vals) > 0 {
		if err := semctlAll(id, semSetAll, vals); err != nil {
			return fmt.Errorf("semaphore set %d: SETALL: %w", id, err)
		}
	}
	return nil
}

// include/uapi/linux/sem.h, msg.h.
const (
	semGetAll = 13      // GETALL
	semSetAll = 17      // SETALL
	msgCopyFl = 0o40000 // MSG_COPY
)

// Create makes object o of kind in the calling thread's IPC namespace
// with o's id (SetNextID), key, owner and mode, and returns its id.
func Create(kind string, o Object) error {
	if err := SetNextID(kind, o.ID); err != nil {
		return err
	}
	flags := unix.IPC_CREAT | unix.IPC_EXCL | int(o.Mode&0o777)
	var id int
	var err error
	switch kind {
	case "shm":
		id, err = unix.SysvShmGet(int(o.Key), int(o.Size), flags)
	case "msg":
		id, err = msgget(o.Key, flags)
	case "sem":
		id, err = semget(o.Key, int(o.Size), flags)
	default:
		return fmt.Errorf("sysvipc: no kind %q", kind)
	}
	if err != nil {
		SetNextID(kind, -1)
		return fmt.Errorf("%sget key %#x: %w", kind, uint32(o.Key), err)
	}
	if id != o.ID {
		return fmt.Errorf("%s %d was made as %d", kind, o.ID, id)
	}
	return setOwner(kind, id, o.Uid, o.Gid, o.Mode&0o777)
}

// Remove removes object id of kind.
func Remove(kind string, id int) error {
	switch kind {
	case "shm":
		_, err := unix.SysvShmCtl(id, unix.IPC_RMID, nil)
		return err
	default:
		return ctlRmid(kind, id)
	}
}
