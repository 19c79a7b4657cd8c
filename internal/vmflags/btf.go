package vmflags

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
)

// BTF kinds (include/uapi/linux/btf.h, BTF_KIND_*).
const (
	kindInt      = 1
	kindPtr      = 2
	kindArray    = 3
	kindStruct   = 4
	kindUnion    = 5
	kindEnum     = 6
	kindFwd      = 7
	kindTypedef  = 8
	kindVolatile = 9
	kindConst    = 10
	kindRestrict = 11
	kindFunc     = 12
	kindProto    = 13
	kindVar      = 14
	kindDatasec  = 15
	kindFloat    = 16
	kindDeclTag  = 17
	kindTypeTag  = 18
	kindEnum64   = 19
)

const btfMagic = 0xeb9f

// kernelInfo is what the iterator program needs from the kernel's BTF.
type kernelInfo struct {
	iterFunc                uint32 // BTF id of bpf_iter_task_vma
	vmStart, vmEnd, vmFlags uint32 // offsets in struct vm_area_struct
}

// btf is a parsed BTF blob: the type records, indexed by id, over the raw
// bytes (nothing is decoded that is not asked for).
type btf struct {
	types, strs []byte
	offs        []uint32 // offs[id] is the record of type id in types (id 0 is void)
}

// parseBTF indexes a BTF blob (/sys/kernel/btf/vmlinux).
func parseBTF(b []byte) (*btf, error) {
	if len(b) < 24 || binary.LittleEndian.Uint16(b) != btfMagic {
		return nil, errors.New("not BTF (bad magic)")
	}
	hdrLen := binary.LittleEndian.Uint32(b[4:])
	typeOff, typeLen := binary.LittleEndian.Uint32(b[8:]), binary.LittleEndian.Uint32(b[12:])
	strOff, strLen := binary.LittleEndian.Uint32(b[16:]), binary.LittleEndian.Uint32(b[20:])
	section := func(off, n uint32) ([]byte, error) {
		start := uint64(hdrLen) + uint64(off)
		if start+uint64(n) > uint64(len(b)) {
			return nil, fmt.Errorf("section at %d+%d past the end (%d bytes)", start, n, len(b))
		}
		return b[start : start+uint64(n)], nil
	}
	t := &btf{offs: make([]uint32, 1, 1<<17)}
	var err error
	if t.types, err = section(typeOff, typeLen); err != nil {
		return nil, err
	}
	if t.strs, err = section(strOff, strLen); err != nil {
		return nil, err
	}
	for off := 0; off < len(t.types); {
		if off+12 > len(t.types) {
			return nil, fmt.Errorf("type %d at offset %d: truncated", len(t.offs), off)
		}
		info := binary.LittleEndian.Uint32(t.types[off+4:])
		vlen, kind := int(info&0xffff), int(info>>24&0x1f)
		var extra int
		switch kind {
		case kindInt, kindVar, kindDeclTag:
			extra = 4
		case kindArray:
			extra = 12
		case kindStruct, kindUnion, kindDatasec, kindEnum64:
			extra = 12 * vlen
		case kindEnum, kindProto:
			extra = 8 * vlen
		case kindPtr, kindFwd, kindTypedef, kindVolatile, kindConst, kindRestrict, kindFunc, kindFloat, kindTypeTag:
		default:
			return nil, fmt.Errorf("type %d at offset %d: unknown kind %d", len(t.offs), off, kind)
		}
		if off+12+extra > len(t.types) {
			return nil, fmt.Errorf("type %d at offset %d: truncated", len(t.offs), off)
		}
		t.offs = append(t.offs, uint32(off))
		off += 12 + extra
	}
	return t, nil
}

func (t *btf) rec(id uint32) (nameOff uint32, kind int, kflag bool, vlen int, sizeOrType uint32, body []byte) {
	off := t.offs[id]
	r := t.types[off:]
	info := binary.LittleEndian.Uint32(r[4:])
	return binary.LittleEndian.Uint32(r), int(info >> 24 & 0x1f), info>>31 != 0, int(info & 0xffff),
		binary.LittleEndian.Uint32(r[8:]), r[12:]
}

// nameIs reports whether the string at off is name.
func (t *btf) nameIs(off uint32, name string) bool {
	if int(off)+len(name) >= len(t.strs) {
		return false
	}
	return string(t.strs[off:int(off)+len(name)]) == name && t.strs[int(off)+len(name)] == 0
}

// find returns the ids of the first types of the kinds and names asked
// (0 where none), in one pass.
func (t *btf) find(want ...typeName) []uint32 {
	ids := make([]uint32, len(want))
	left := len(want)
	for id := 1; id < len(t.offs) && left > 0; id++ {
		off := t.offs[id]
		nameOff := binary.LittleEndian.Uint32(t.types[off:])
		if nameOff == 0 {
			continue
		}
		kind := int(t.types[off+7] & 0x1f)
		for i, w := range want {
			if ids[i] == 0 && kind == w.kind && t.nameIs(nameOff, w.name) {
				ids[i] = uint32(id)
				left--
			}
		}
	}
	return ids
}

type typeName struct {
	kind int
	name string
}

// skipQualifiers follows typedefs and qualifiers to the type they name.
func (t *btf) skipQualifiers(id uint32) uint32 {
	for range 32 {
		if id == 0 || int(id) >= len(t.offs) {
			return 0
		}
		_, kind, _, _, typ, _ := t.rec(id)
		switch kind {
		case kindTypedef, kindVolatile, kindConst, kindRestrict, kindTypeTag:
			id = typ
		default:
			return id
		}
	}
	return 0
}

// member finds a member of the struct or union id by name, looking into
// anonymous members, and returns its byte offset and the size of its type
// (0 if not an integer).
func (t *btf) member(id uint32, name string) (off, size uint32, ok bool) {
	id = t.skipQualifiers(id)
	if id == 0 {
		return 0, 0, false
	}
	_, kind, kflag, vlen, _, body := t.rec(id)
	if kind != kindStruct && kind != kindUnion {
		return 0, 0, false
	}
	for i := range vlen {
		m := body[12*i:]
		nameOff, typ, bits := binary.LittleEndian.Uint32(m), binary.LittleEndian.Uint32(m[4:]), binary.LittleEndian.Uint32(m[8:])
		if kflag {
			if bits>>24 != 0 {
				continue // a bitfield
			}
			bits &= 0xffffff
		}
		if bits%8 != 0 {
			continue
		}
		if nameOff == 0 {
			if o, s, ok := t.member(typ, name); ok {
				return bits/8 + o, s, true
			}
			continue
		}
		if !t.nameIs(nameOff, name) {
			continue
		}
		if it := t.skipQualifiers(typ); it != 0 {
			if _, k, _, _, sz, _ := t.rec(it); k == kindInt {
				return bits / 8, sz, true
			}
		}
		return bits / 8, 0, true
	}
	return 0, 0, false
}

// kernelInfoFrom finds in the kernel's BTF what the iterator needs.
func kernelInfoFrom(b []byte) (kernelInfo, error) {
	var ki kernelInfo
	if !bytes.HasPrefix(b, []byte{0x9f, 0xeb}) {
		return ki, errors.New("not little-endian BTF")
	}
	t, err := parseBTF(b)
	if err != nil {
		return ki, err
	}
	ids := t.find(typeName{kindFunc, "bpf_iter_task_vma"}, typeName{kindStruct, "vm_area_struct"})
	if ki.iterFunc = ids[0]; ki.iterFunc == 0 {
		return ki, errors.New("no bpf_iter_task_vma (the task_vma iterator came in 5.12)")
	}
	vma := ids[1]
	if vma == 0 {
		return ki, errors.New("no struct vm_area_struct")
	}
	for _, f := range []struct {
		name string
		dst  *uint32
	}{{"vm_start", &ki.vmStart}, {"vm_end", &ki.vmEnd}, {"vm_flags", &ki.vmFlags}} {
		off, size, ok := t.member(vma, f.name)
		if !ok || size != 8 {
			return ki, fmt.Errorf("struct vm_area_struct: no 8-byte %s", f.name)
		}
		*f.dst = off
	}
	return ki, nil
}
