package vmflags

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// bpf(2) commands, program and attach types (include/uapi/linux/bpf.h).
const (
	bpfProgLoad   = 5  // BPF_PROG_LOAD
	bpfLinkCreate = 28 // BPF_LINK_CREATE
	bpfIterCreate = 33 // BPF_ITER_CREATE

	progTypeTracing = 26 // BPF_PROG_TYPE_TRACING
	attachTraceIter = 28 // BPF_TRACE_ITER

	funcSeqWrite = 127 // BPF_FUNC_seq_write
)

// Instruction encoding (include/uapi/linux/bpf_common.h, bpf.h).
const (
	opLdxDW   = 0x79 // BPF_LDX | BPF_MEM | BPF_DW
	opStxDW   = 0x7b // BPF_STX | BPF_MEM | BPF_DW
	opJeqImm  = 0x15 // BPF_JMP | BPF_JEQ | BPF_K
	opMovReg  = 0xbf // BPF_ALU64 | BPF_MOV | BPF_X
	opMovImm  = 0xb7 // BPF_ALU64 | BPF_MOV | BPF_K
	opAddImm  = 0x07 // BPF_ALU64 | BPF_ADD | BPF_K
	opCall    = 0x85 // BPF_JMP | BPF_CALL
	opExit    = 0x95 // BPF_JMP | BPF_EXIT
	regFP     = 10
	recordLen = 24 // what the program writes per VMA: start, end, flags
)

func insn(op uint8, dst, src uint8, off int16, imm int32) []byte {
	b := make([]byte, 8)
	b[0], b[1] = op, dst|src<<4
	binary.LittleEndian.PutUint16(b[2:], uint16(off))
	binary.LittleEndian.PutUint32(b[4:], uint32(imm))
	return b
}

// program assembles the iterator: for each VMA of the task, write its
// start, end and vm_flags (little-endian u64s) to the seq_file.
//
//	r6 = ctx->meta; r7 = ctx->vma
//	if r7 == 0 goto out        (the last call has no VMA)
//	fp[-24] = r7->vm_start; fp[-16] = r7->vm_end; fp[-8] = r7->vm_flags
//	bpf_seq_write(r6->seq, fp-24, 24)
//	out: return 0
func program(ki kernelInfo) []byte {
	var p []byte
	add := func(b []byte) { p = append(p, b...) }
	add(insn(opLdxDW, 6, 1, 0, 0))  // struct bpf_iter__task_vma: meta at 0,
	add(insn(opLdxDW, 7, 1, 16, 0)) // task at 8, vma at 16
	add(insn(opJeqImm, 7, 0, 11, 0))
	for i, off := range []uint32{ki.vmStart, ki.vmEnd, ki.vmFlags} {
		add(insn(opLdxDW, 2, 7, int16(off), 0))
		add(insn(opStxDW, regFP, 2, int16(-24+8*i), 0))
	}
	add(insn(opLdxDW, 1, 6, 0, 0)) // struct bpf_iter_meta: seq at 0
	add(insn(opMovReg, 2, regFP, 0, 0))
	add(insn(opAddImm, 2, 0, 0, -24))
	add(insn(opMovImm, 3, 0, 0, recordLen))
	add(insn(opCall, 0, 0, 0, funcSeqWrite))
	add(insn(opMovImm, 0, 0, 0, 0)) // out:
	add(insn(opExit, 0, 0, 0, 0))
	return p
}

// iterator is the loaded program (its fd lives as long as ferry).
type iterator struct {
	prog int
}

// loadIterator loads the program for the kernel described by ki.
func loadIterator(ki kernelInfo) (*iterator, error) {
	insns := program(ki)
	fd, err := progLoad(insns, ki.iterFunc, nil)
	if err != nil {
		// Again with the verifier's log, for the error.
		log := make([]byte, 16<<10)
		if _, err2 := progLoad(insns, ki.iterFunc, log); err2 != nil {
			if n := cstrLen(log); n > 0 {
				return nil, fmt.Errorf("%w: %s", err, log[:n])
			}
		}
		return nil, err
	}
	return &iterator{prog: fd}, nil
}

func cstrLen(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return len(b)
}

// record is one VMA as the program reports it.
type record struct {
	start, end, flags uint64
}

// read runs the iterator over the VMAs of process pid, each once.
//
// The link names the process (bpf_iter_link_info.task.pid), not a
// thread (.tid): on 6.18 a task_vma iterator on a tid never ends, its read
// blocks for good (verified here; the pid filter returns each VMA once,
// with any number of threads).
func (it *iterator) read(pid int) ([]record, error) {
	link, err := linkCreate(it.prog, pid)
	if err != nil {
		return nil, err
	}
	defer unix.Close(link)
	fd, err := iterCreate(link)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "bpf task_vma iterator")
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, err
	}
	if len(b)%recordLen != 0 {
		return nil, fmt.Errorf("task_vma iterator: %d bytes, not a multiple of %d", len(b), recordLen)
	}
	out := make([]record, 0, len(b)/recordLen)
	for i := 0; i < len(b); i += recordLen {
		out = append(out, record{binary.LittleEndian.Uint64(b[i:]), binary.LittleEndian.Uint64(b[i+8:]), binary.LittleEndian.Uint64(b[i+16:])})
	}
	return out, nil
}
