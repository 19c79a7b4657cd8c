package restorecore

import (
	"errors"
	"fmt"
	"io"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/sysvipc"
)

// makeIpcNs makes the SysV objects of ipc.img in the new IPC namespace
// of the root (pid here), each with its id, key, owner, mode and
// contents, from a thread that joins the namespace. Segments removed
// while attached are removed again once the tree holds them
// (removeSysv); everything goes with the namespace if the restore fails.
func (r *restorer) makeIpcNs(pid int) error {
	rd, err := images.Open(r.is.dir, images.IpcName, images.KindIpc)
	if err != nil {
		return err
	}
	defer rd.Close()
	var objs []*pb.IpcObject
	for {
		o := &pb.IpcObject{}
		if err := rd.Next(o); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return err
		}
		objs = append(objs, o)
	}
	return proc.InNamespace(pid, "ipc", func() error {
		for _, o := range objs {
			obj := sysvipc.Object{Key: o.Key, ID: int(o.Id), Mode: o.Mode, Uid: o.Uid, Gid: o.Gid, Size: o.Size}
			if err := sysvipc.Create(o.Kind, obj); err != nil {
				return err
			}
			var err error
			switch o.Kind {
			case "shm":
				if o.Removed {
					r.ipcRemoved = append(r.ipcRemoved, int(o.Id))
				}
				err = sysvipc.WriteShm(int(o.Id), o.Data)
			case "msg":
				msgs := make([]sysvipc.Message, len(o.Messages))
				for i, m := range o.Messages {
					msgs[i] = sysvipc.Message{Type: m.Type, Data: m.Data}
				}
				err = sysvipc.WriteQueue(int(o.Id), msgs)
			case "sem":
				vals := make([]uint16, len(o.SemValues))
				for i, v := range o.SemValues {
					vals[i] = uint16(v)
				}
				err = sysvipc.WriteSems(int(o.Id), vals)
			}
			if err != nil {
				return err
			}
		}
		r.log.Info("IPC namespace made", "objects", len(objs))
		return nil
	})
}

// removeIpcRemoved removes, inside the tree's IPC namespace (of the root,
// pid here), the segments that were removed while attached.
func (r *restorer) removeIpcRemoved(pid int) {
	if len(r.ipcRemoved) == 0 {
		return
	}
	err := proc.InNamespace(pid, "ipc", func() error {
		for _, id := range r.ipcRemoved {
			if err := sysvipc.Remove("shm", id); err != nil {
				return fmt.Errorf("segment %d: %w", id, err)
			}
		}
		return nil
	})
	if err != nil {
		r.log.Warn("removing SysV shared memory in the IPC namespace", "err", err)
	}
}
