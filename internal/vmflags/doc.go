// Package vmflags reads the VmFlags of a process's VMAs without walking its
// page tables.
//
// /proc/PID/smaps is the only file that shows a VMA's flags (dd, dc, wf,
// hg, lo, uw, ...), and it computes every VMA's Rss on the way: a walk of
// every page table entry, ~20 ms per GiB of resident memory on this
// kind of machine, spent while the tree is frozen. A BPF task_vma
// iterator reads the same vm_flags word of each VMA for a few
// microseconds, whatever the size.
//
// The iterator program is a handful of instructions assembled here; what it
// needs from the running kernel (the BTF id of bpf_iter_task_vma and the
// offsets of vm_start, vm_end and vm_flags in struct vm_area_struct) is
// read from /sys/kernel/btf/vmlinux by a scanner of our own: cilium/ebpf
// does this in ~100 ms, more than smaps of a 4 GiB process costs.
//
// vm_flags bits are not ABI: their positions change between kernels. The
// names smaps prints for them are learned on the running kernel, once per
// process, by comparing smaps and the iterator on probe mappings ferry makes
// in itself with known flags (madvise, mlock2, userfaultfd, ...). A VMA
// with a bit not learned that way is read from smaps, as is every VMA
// when the iterator is not available (no BTF, no CAP_BPF, a kernel before
// 6.1): the answer is always exactly what smaps shows.
package vmflags
