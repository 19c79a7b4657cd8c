package lazypages

import "sort"

const pageSize = 4096

// pendSpan is a range of pages not yet delivered: [start, end) in the
// process now, whose data is at src in the images (src differs from start
// only after an mremap moved the pages). A delivered span collapses to
// [end, end) in place, which keeps the slice sorted.
type pendSpan struct {
	start, end, src uint64
}

// pending is the sorted set of pages still to deliver. Removals update
// spans in place (a split inserts one span), the page count is kept
// running, and head skips the collapsed spans at the front: delivering
// in address order costs O(1) per chunk, not O(spans).
type pending struct {
	spans []pendSpan
	head  int
	n     uint64 // pages pending
}

func newPending(spans []pendSpan) pending {
	p := pending{spans: spans}
	for _, s := range spans {
		p.n += (s.end - s.start) / pageSize
	}
	return p
}

func (p *pending) empty() bool { return p.n == 0 }

func (p *pending) pages() uint64 { return p.n }

// first returns the lowest pending span.
func (p *pending) first() (pendSpan, bool) {
	for p.head < len(p.spans) && p.spans[p.head].start == p.spans[p.head].end {
		p.head++
	}
	if p.head == len(p.spans) {
		return pendSpan{}, false
	}
	return p.spans[p.head], true
}

// from returns the first pending span ending after va (delivered spans,
// collapsed in place, are skipped).
func (p *pending) from(va uint64) (pendSpan, bool) {
	for i := p.index(va); i < len(p.spans); i++ {
		if p.spans[i].start < p.spans[i].end {
			return p.spans[i], true
		}
	}
	return pendSpan{}, false
}

// index returns the first span ending after va.
func (p *pending) index(va uint64) int {
	return sort.Search(len(p.spans), func(i int) bool { return p.spans[i].end > va })
}

// find returns the span containing va.
func (p *pending) find(va uint64) (pendSpan, bool) {
	i := p.index(va)
	if i < len(p.spans) && p.spans[i].start <= va && va < p.spans[i].end {
		return p.spans[i], true
	}
	return pendSpan{}, false
}

// remove takes [a, b) out of the set.
func (p *pending) remove(a, b uint64) {
	for i := p.index(a); i < len(p.spans) && p.spans[i].start < b; i++ {
		s := p.spans[i]
		lo, hi := max(s.start, a), min(s.end, b)
		if lo >= hi {
			continue
		}
		p.n -= (hi - lo) / pageSize
		switch {
		case lo == s.start && hi == s.end:
			p.spans[i] = pendSpan{s.end, s.end, s.src}
		case lo == s.start:
			p.spans[i] = pendSpan{hi, s.end, s.src + (hi - s.start)}
		case hi == s.end:
			p.spans[i] = pendSpan{s.start, lo, s.src}
		default: // split
			tail := pendSpan{hi, s.end, s.src + (hi - s.start)}
			p.spans[i].end = lo
			p.spans = append(p.spans, pendSpan{})
			copy(p.spans[i+2:], p.spans[i+1:])
			p.spans[i+1] = tail
			i++
		}
	}
}

// move relocates the pending pages of [from, from+n) to [to, to+n).
func (p *pending) move(from, to, n uint64) {
	var moved []pendSpan
	for i := p.index(from); i < len(p.spans) && p.spans[i].start < from+n; i++ {
		s := p.spans[i]
		a, b := max(s.start, from), min(s.end, from+n)
		if a < b {
			moved = append(moved, pendSpan{a - from + to, b - from + to, s.src + (a - s.start)})
		}
	}
	p.remove(from, from+n)
	p.remove(to, to+n)
	var live []pendSpan
	for _, s := range p.spans {
		if s.start < s.end {
			live = append(live, s)
		}
	}
	live = append(live, moved...)
	sort.Slice(live, func(i, j int) bool { return live[i].start < live[j].start })
	*p = newPending(live)
}

// clone copies the set (a child forked during post-copy).
func (p *pending) clone() pending {
	var live []pendSpan
	for _, s := range p.spans[p.head:] {
		if s.start < s.end {
			live = append(live, s)
		}
	}
	return newPending(live)
}

// restrict returns the set of the pending pages whose data (at src) lies
// in ranges (sorted, disjoint): memory a dump left unlisted is pending
// whole until the list of its present pages arrives.
func (p *pending) restrict(ranges [][2]uint64) pending {
	var out []pendSpan
	for _, s := range p.spans[p.head:] {
		if s.start == s.end {
			continue
		}
		srcEnd := s.src + (s.end - s.start)
		i := sort.Search(len(ranges), func(i int) bool { return ranges[i][1] > s.src })
		for ; i < len(ranges) && ranges[i][0] < srcEnd; i++ {
			a, b := max(ranges[i][0], s.src), min(ranges[i][1], srcEnd)
			out = append(out, pendSpan{s.start + (a - s.src), s.start + (b - s.src), a})
		}
	}
	return newPending(out)
}
