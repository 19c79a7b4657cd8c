package uffd

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Scanner runs PAGEMAP_SCAN on one process's /proc/PID/pagemap.
type Scanner struct {
	f   *os.File
	vec []Region
}

// OpenScanner opens pid's pagemap for scanning (pid 0: the caller).
func OpenScanner(pid int) (*Scanner, error) {
	path := "/proc/self/pagemap"
	if pid != 0 {
		path = "/proc/" + strconv.Itoa(pid) + "/pagemap"
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	return &Scanner{f: f, vec: make([]Region, 512)}, nil
}

// Close closes the pagemap.
func (s *Scanner) Close() error { return s.f.Close() }

// Query selects pages for Scan.
type Query struct {
	Flags      uint64 // ScanWPMatching, ScanCheckWPAsync
	Inverted   uint64 // categories that count when absent
	Mask       uint64 // all of these
	AnyOf      uint64 // at least one of these
	ReturnMask uint64 // categories reported in Region.Categories
}

// Written selects pages written since they were last write-protected, and
// (ScanWPMatching) write-protects them again in the same pass.
var Written = Query{
	Flags: ScanWPMatching | ScanCheckWPAsync, Mask: PageWritten, ReturnMask: PageWritten,
}

// Scan returns the regions of [start, end) matching q, merged where
// adjacent with equal categories. It continues past a full output buffer
// from max(walk_end, end of the last region), which copes with walk_end
// being stale when the kernel's own buffer overflowed. Scan one VMA at a
// time with ScanCheckWPAsync: crossing into an unregistered VMA fails
// with EPERM (the regions found before that are salvaged and returned
// with the error).
func (s *Scanner) Scan(start, end uint64, q Query) ([]Region, error) {
	var out []Region
	cur := start
	for cur < end {
		clear(s.vec)
		a := scanArgs{Flags: q.Flags, Start: cur, End: end, CategoryInverted: q.Inverted,
			CategoryMask: q.Mask, CategoryAnyofMask: q.AnyOf, ReturnMask: q.ReturnMask}
		n, walkEnd, err := scanIoctl(int(s.f.Fd()), &a, s.vec)
		if err != nil {
			if errors.Is(err, unix.EPERM) {
				// The kernel filled regions but did not return their count.
				for _, r := range s.vec {
					if r.End > r.Start {
						out = appendRegion(out, r)
					}
				}
				return out, fmt.Errorf("PAGEMAP_SCAN %#x-%#x stopped at %#x (range leaves the registered VMA): %w",
					cur, end, walkEnd, os.NewSyscallError("ioctl", err))
			}
			return out, fmt.Errorf("PAGEMAP_SCAN %#x-%#x: %w", cur, end, os.NewSyscallError("ioctl", err))
		}
		for _, r := range s.vec[:n] {
			out = appendRegion(out, r)
		}
		if n < len(s.vec) {
			return out, nil
		}
		next := walkEnd
		if last := s.vec[n-1].End; last > next {
			next = last
		}
		if next <= cur {
			return out, fmt.Errorf("PAGEMAP_SCAN %#x-%#x made no progress", cur, end)
		}
		cur = next
	}
	return out, nil
}

// appendRegion adds r, clipping any overlap with what is already there
// and merging with an adjacent region of equal categories.
func appendRegion(out []Region, r Region) []Region {
	if l := len(out); l > 0 {
		last := &out[l-1]
		if r.Start < last.End {
			r.Start = last.End
		}
		if r.End <= r.Start {
			return out
		}
		if r.Start == last.End && r.Categories == last.Categories {
			last.End = r.End
			return out
		}
	}
	return append(out, r)
}

// Pages counts the pages in regions.
func Pages(rs []Region) uint64 {
	var n uint64
	for _, r := range rs {
		n += (r.End - r.Start) / 4096
	}
	return n
}
