package dumpcore

import (
	"fmt"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/sysvipc"
)

// checkSysvWhole refuses, in an IPC namespace of the tree's own, a SysV
// segment attached in part (from an offset, or cut short): the restore
// attaches segments whole.
func (t *tree) checkSysvWhole(imgs []*imageSet) error {
	if t.ipc == nil {
		return nil
	}
	size := map[uint64]uint64{}
	for _, o := range t.ipc {
		if o.Kind == "shm" {
			size[uint64(o.Id)] = (o.Size + pageSize - 1) &^ (pageSize - 1)
		}
	}
	for _, img := range imgs {
		for _, v := range img.mm.Vmas {
			if v.Sysv && (v.Pgoff != 0 || v.End-v.Start != size[v.ShmemIno]) {
				return fmt.Errorf("process %d: SysV segment %d attached in part at %#x, which ferry does not restore yet: %w", img.pstree.Pid, v.ShmemIno, v.Start, ErrUnsupported)
			}
		}
	}
	return nil
}

// ipcNamespace reads every SysV object of the tree's IPC namespace, if it
// has one of its own: shared memory segments with their contents
// (attached or not, removed or not), message queues with their messages
// (copied, MSG_COPY: they stay queued), semaphore sets with their values.
// It runs on a thread that joins the namespace.
func (t *tree) ipcNamespace() ([]*pb.IpcObject, error) {
	if t.ownNs["ipc"] == "" {
		return nil, nil
	}
	var out []*pb.IpcObject
	err := proc.InNamespace(t.root, "ipc", func() error {
		for _, kind := range []string{"shm", "msg", "sem"} {
			objs, err := sysvipc.List(kind)
			if err != nil {
				return err
			}
			for _, o := range objs {
				e := &pb.IpcObject{Kind: kind, Key: o.Key, Id: int32(o.ID), Uid: o.Uid, Gid: o.Gid, Mode: o.Mode & 0o777, Size: o.Size}
				switch kind {
				case "shm":
					e.Removed = o.Mode&sysvipc.ShmDest != 0
					if e.Data, err = sysvipc.ReadShm(o.ID, o.Size); err != nil {
						return err
					}
				case "msg":
					msgs, err := sysvipc.ReadQueue(o.ID, o.Count, o.Size)
					if err != nil {
						return err
					}
					for _, m := range msgs {
						e.Messages = append(e.Messages, &pb.IpcMessage{Type: m.Type, Data: m.Data})
					}
				case "sem":
					vals, err := sysvipc.ReadSems(o.ID, int(o.Size))
					if err != nil {
						return err
					}
					for _, v := range vals {
						e.SemValues = append(e.SemValues, uint32(v))
					}
				}
				out = append(out, e)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("IPC namespace of %d: %w", t.root, err)
	}
	return out, nil
}
