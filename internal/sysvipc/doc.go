// Package sysvipc reads and makes the SysV IPC objects of an IPC
// namespace: shared memory segments, message queues and semaphore sets.
// Its functions act in the IPC namespace of the calling thread (see
// proc.InNamespace): /proc/sysvipc/* lists that namespace's objects and
// /proc/sys/kernel/*_next_id chooses the id the next one gets there.
package sysvipc
