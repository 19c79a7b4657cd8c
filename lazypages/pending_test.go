package lazypages

import "testing"

func TestPendingOps(t *testing.T) {
	pp := newPending([]pendSpan{{0x1000, 0x5000, 0x1000}, {0x8000, 0x9000, 0x8000}})
	p := &pp
	p.remove(0x2000, 0x3000)
	if len(p.spans) != 3 || p.spans[1] != (pendSpan{0x3000, 0x5000, 0x3000}) || p.pages() != 4 {
		t.Fatalf("remove: %+v", p.spans)
	}
	p.remove(0x1000, 0x2000) // collapses the first span in place
	if f, ok := p.first(); !ok || f.start != 0x3000 || p.pages() != 3 {
		t.Fatalf("first after removing the head: %+v %v", f, ok)
	}
	p.move(0x3000, 0x20000, 0x2000)
	s, ok := p.find(0x21000)
	if !ok || s.src != 0x3000 || s.start != 0x20000 {
		t.Fatalf("move: %+v %v", s, ok)
	}
	if _, ok := p.find(0x3000); ok {
		t.Fatal("moved pages still at the old address")
	}
	if p.pages() != 1+2 {
		t.Fatalf("pages %d", p.pages())
	}
}
