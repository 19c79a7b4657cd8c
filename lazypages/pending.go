package lazypages

import "sort"

// pendSpan is a range of pages not yet delivered: [start, end) in the
// process now, whose data is at src in the images (src differs from start
// only after an mremap moved the pages).
type pendSpan struct {
	start, end, src uint64
}

// pending is the sorted set of pages still to deliver.
type pending struct{ spans []pendSpan }

func (p *pending) empty() bool { return len(p.spans) == 0 }

// find returns the span containing va.
func (p *pending) find(va uint64) (pendSpan, bool) {
	i := sort.Search(len(p.spans), func(i int) bool { return p.spans[i].end > va })
	if i < len(p.spans) && p.spans[i].start <= va {
		return p.spans[i], true
	}
	return pendSpan{}, false
}

// remove takes [a, b) out of the set.
func (p *pending) remove(a, b uint64) {
	var out []pendSpan
	for _, s := range p.spans {
		if s.end <= a || s.start >= b {
			out = append(out, s)
			continue
		}
		if s.start < a {
			out = append(out, pendSpan{s.start, a, s.src})
		}
		if s.end > b {
			out = append(out, pendSpan{b, s.end, s.src + (b - s.start)})
		}
	}
	p.spans = out
}

// move relocates the pending pages of [from, from+n) to [to, to+n).
func (p *pending) move(from, to, n uint64) {
	var moved []pendSpan
	for _, s := range p.spans {
		a, b := max(s.start, from), min(s.end, from+n)
		if a < b {
			moved = append(moved, pendSpan{a - from + to, b - from + to, s.src + (a - s.start)})
		}
	}
	p.remove(from, from+n)
	p.remove(to, to+n)
	p.spans = append(p.spans, moved...)
	sort.Slice(p.spans, func(i, j int) bool { return p.spans[i].start < p.spans[j].start })
}

func (p *pending) pages() uint64 {
	var n uint64
	for _, s := range p.spans {
		n += (s.end - s.start) / pageSize
	}
	return n
}

const pageSize = 4096
