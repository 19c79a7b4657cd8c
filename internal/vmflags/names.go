package vmflags

import (
	"fmt"
	"math/bits"
)

// names maps vm_flags bits to what smaps prints for them, as learned on
// the running kernel.
type names struct {
	name  [64]string
	known uint64
}

// learn takes one VMA's bits and smaps' names for it. smaps prints the
// names in bit order and skips bits it has no name for (protection keys):
// a VMA with as many names as bits says which bit is which, any other
// teaches nothing.
func (n *names) learn(v uint64, flags []string) error {
	if bits.OnesCount64(v) != len(flags) {
		return nil
	}
	for i := 0; v != 0; i++ {
		b := bits.TrailingZeros64(v)
		v &^= 1 << b
		if n.known&(1<<b) != 0 && n.name[b] != flags[i] {
			return fmt.Errorf("vm_flags bit %d shows as both %q and %q", b, n.name[b], flags[i])
		}
		n.name[b] = flags[i]
		n.known |= 1 << b
	}
	return nil
}

// flags returns smaps' names for v, or false if it has a bit not learned.
func (n *names) flags(v uint64) ([]string, bool) {
	if v&^n.known != 0 {
		return nil, false
	}
	out := make([]string, 0, bits.OnesCount64(v))
	for v != 0 {
		b := bits.TrailingZeros64(v)
		v &^= 1 << b
		out = append(out, n.name[b])
	}
	return out, true
}
