package images

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"sort"
	"sync"

	"github.com/ferrycr/ferry/images/pb"
)

// PageRun is page data ready to copy: pages [Vaddr, Vaddr+len(Data)).
type PageRun struct {
	Vaddr uint64
	Data  []byte
}

// maxChain bounds the parent chain of an incremental image set.
const maxChain = 64

// PageChain resolves the memory of a process in an image directory into
// runs of page data, following in_parent entries through the parent image
// sets (--prev-images-dir). It keeps the page files mapped until Close.
type PageChain struct {
	closers []io.Closer
	// Cache, when set, supplies parent image sets resolved already.
	Cache *ChainCache
}

// ChainCache keeps the runs of image sets resolved ahead, for the chains
// resolved later whose parents they are: a migration's target resolves
// each pre-copy round as it arrives, not all of them once the tree is
// frozen (three rounds of a fragmented 4 GiB process: ~190 ms here).
// Its runs stay valid until Close.
type ChainCache struct {
	mu    sync.Mutex
	chain PageChain
	sets  map[chainKey][]PageRun
	done  bool
}

type chainKey struct {
	dir string
	pid int32
}

// Resolve resolves pid's pages in dir (and its parents) and keeps them.
func (cc *ChainCache) Resolve(dir string, pid int32) error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.done {
		return errors.New("chain cache closed")
	}
	k := chainKey{filepath.Clean(dir), pid}
	if _, ok := cc.sets[k]; ok {
		return nil
	}
	cc.chain.Cache = cc
	runs, err := cc.chain.resolve(dir, pid, 0, nil, nil, nil)
	if err != nil {
		return err
	}
	if cc.sets == nil {
		cc.sets = map[chainKey][]PageRun{}
	}
	cc.sets[k] = runs
	return nil
}

// lookup returns the runs kept for pid in dir, waiting for a Resolve
// under way. Called by a chain of cc's own, it holds cc.mu already.
func (cc *ChainCache) lookup(dir string, pid int32, own bool) ([]PageRun, bool) {
	if !own {
		cc.mu.Lock()
		defer cc.mu.Unlock()
	}
	runs, ok := cc.sets[chainKey{filepath.Clean(dir), pid}]
	return runs, ok
}

// Close unmaps what the cache holds (once every chain using it is done).
func (cc *ChainCache) Close() {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if !cc.done {
		cc.done = true
		cc.chain.Close()
		cc.sets = nil
	}
}

// Close unmaps the page files.
func (c *PageChain) Close() {
	for _, cl := range c.closers {
		cl.Close()
	}
}

// Resolve returns the runs of dir's pagemap for pid, sorted by address.
func (c *PageChain) Resolve(dir string, pid int32) ([]PageRun, error) {
	return c.resolve(dir, pid, 0, nil, nil, nil)
}

// ResolveEntries is Resolve for a pagemap the caller has read already
// (head and entries, as ReadPagemap returns them); keep, when not nil,
// picks the entries whose data is wanted (the others give no runs).
func (c *PageChain) ResolveEntries(dir string, pid int32, head *pb.PagemapHead, entries []PageEntry, keep func(PageEntry) bool) ([]PageRun, error) {
	return c.resolve(dir, pid, 0, head, entries, keep)
}

func (c *PageChain) resolve(dir string, pid int32, depth int, head *pb.PagemapHead, entries []PageEntry, keep func(PageEntry) bool) ([]PageRun, error) {
	if depth > maxChain {
		return nil, fmt.Errorf("%s: parent image chain longer than %d", dir, maxChain)
	}
	if c.Cache != nil && head == nil && keep == nil {
		if runs, ok := c.Cache.lookup(dir, pid, c == &c.Cache.chain); ok {
			return runs, nil
		}
	}
	name := PagemapName(pid)
	if head == nil {
		var err error
		if head, entries, err = ReadPagemap(dir, pid); err != nil {
			return nil, err
		}
	}
	if head.Compression != "" && head.Compression != Zstd {
		return nil, fmt.Errorf("%s: page compression %q is not supported by this ferry: %w", filepath.Join(dir, name), head.Compression, ErrVersion)
	}
	needParent := false
	var own int64 // bytes of page data this image set stores
	for _, e := range entries {
		if !e.InParent {
			own += int64(e.NrPages) * 4096
		} else if keep == nil || keep(e) {
			needParent = true
		}
	}
	var data []byte
	pagesName := PagesName(head.PagesId)
	pr, err := OpenPages(dir, pagesName)
	if err != nil {
		return nil, err
	}
	c.closers = append(c.closers, pr)
	if head.Compression == Zstd {
		data, err = pr.Decompressed(own)
	} else {
		data, err = pr.Bytes()
	}
	if err != nil {
		return nil, err
	}
	var parent []PageRun
	if needParent {
		pdir, err := parentOf(dir, pid)
		if err != nil {
			return nil, err
		}
		if parent, err = c.resolve(pdir, pid, depth+1, nil, nil, nil); err != nil {
			return nil, fmt.Errorf("parent images of %s: %w", dir, err)
		}
	}
	var out []PageRun
	if keep == nil {
		out = make([]PageRun, 0, len(entries))
	}
	var off uint64
	for _, e := range entries {
		n := uint64(e.NrPages) * 4096
		if !e.InParent {
			if off+n > uint64(len(data)) {
				return nil, fmt.Errorf("%s: pagemap wants %d bytes at offset %d, file has %d: %w",
					filepath.Join(dir, pagesName), n, off, len(data), ErrTruncated)
			}
			if keep == nil || keep(e) {
				out = append(out, PageRun{Vaddr: e.Vaddr, Data: data[off : off+n]})
			}
			off += n
			continue
		}
		if keep != nil && !keep(e) {
			continue
		}
		runs, err := cut(parent, e.Vaddr, e.Vaddr+n, e.Holes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", filepath.Join(dir, name), err)
		}
		out = append(out, runs...)
	}
	if off != uint64(len(data)) {
		return nil, fmt.Errorf("%s: %d bytes of page data, pagemap accounts for %d: %w",
			filepath.Join(dir, pagesName), len(data), off, ErrCorrupt)
	}
	return out, nil
}

// cut returns the parts of runs inside [start, end), which they must
// cover completely unless holes.
func cut(runs []PageRun, start, end uint64, holes bool) ([]PageRun, error) {
	i := sort.Search(len(runs), func(i int) bool { return runs[i].Vaddr+uint64(len(runs[i].Data)) > start })
	var out []PageRun
	at := start
	for ; i < len(runs) && at < end; i++ {
		r := runs[i]
		if r.Vaddr >= end {
			break
		}
		if r.Vaddr > at {
			if !holes {
				break
			}
			at = r.Vaddr
		}
		s := at - r.Vaddr
		e := min(uint64(len(r.Data)), end-r.Vaddr)
		out = append(out, PageRun{Vaddr: at, Data: r.Data[s:e]})
		at = r.Vaddr + e
	}
	if at < end && !holes {
		return nil, fmt.Errorf("page %#x is marked in the parent image, which does not have it: %w", at, ErrCorrupt)
	}
	return out, nil
}

// PagemapPages returns the pages the pagemap of pid in dir describes
// (stored there or in a parent), in address order, without reading page
// data: the pages the process had at the dump. Parent runs with holes
// are narrowed to the pages the parent chain has.
func PagemapPages(dir string, pid int32) ([][2]uint64, error) {
	return pagemapPages(dir, pid, 0)
}

func pagemapPages(dir string, pid int32, depth int) ([][2]uint64, error) {
	if depth > maxChain {
		return nil, fmt.Errorf("%s: parent image chain longer than %d", dir, maxChain)
	}
	_, entries, err := ReadPagemap(dir, pid)
	if err != nil {
		return nil, err
	}
	return narrowed(dir, pid, entries, func(pdir string) ([][2]uint64, error) {
		parent, err := pagemapPages(pdir, pid, depth+1)
		return Narrow(entries, parent, RangeBounds), err
	})
}

// Pages returns the pages that entries, pid's pagemap in dir, describe:
// Ranges, with the parent runs with holes narrowed to the pages the
// parent chain has (resolved through c: a cache's runs serve).
func (c *PageChain) Pages(dir string, pid int32, entries []PageEntry) ([][2]uint64, error) {
	return narrowed(dir, pid, entries, func(pdir string) ([][2]uint64, error) {
		runs, err := c.resolve(pdir, pid, 1, nil, nil, nil)
		return Narrow(entries, runs, RunBounds), err
	})
}

// narrowed returns the ranges of entries, pid's pagemap in dir, the
// parent runs with holes narrowed to the pages of the parent image set
// (by narrow, given its directory).
func narrowed(dir string, pid int32, entries []PageEntry, narrow func(pdir string) ([][2]uint64, error)) ([][2]uint64, error) {
	if !HasHoles(entries) {
		return Ranges(entries), nil
	}
	pdir, err := parentOf(dir, pid)
	if err != nil {
		return nil, err
	}
	out, err := narrow(pdir)
	if err != nil {
		return nil, fmt.Errorf("parent images of %s: %w", dir, err)
	}
	return out, nil
}

// parentOf returns the parent image set that pid's pagemap in dir takes
// pages from: one it must name.
func parentOf(dir string, pid int32) (string, error) {
	pdir, err := ParentDir(dir)
	if err == nil && pdir == "" {
		err = fmt.Errorf("%s has pages in a parent image but names no parent directory: %w", filepath.Join(dir, PagemapName(pid)), ErrCorrupt)
	}
	return pdir, err
}

// HasHoles tells whether any of entries is a parent run with holes.
func HasHoles(entries []PageEntry) bool {
	return slices.ContainsFunc(entries, func(e PageEntry) bool { return e.Holes })
}

// Ranges returns the page ranges of entries, in their order; a parent run
// with holes gives its whole range (Narrow gives only its pages).
func Ranges(entries []PageEntry) [][2]uint64 {
	out := make([][2]uint64, len(entries))
	for i, e := range entries {
		out[i] = [2]uint64{e.Vaddr, e.End()}
	}
	return out
}

// Narrow returns the page ranges of entries (in address order), a parent
// run with holes narrowed to the parts of it that the parent's pages
// cover: parent, sorted and disjoint, whose bounds gives each one's start
// and end. Adjacent ranges are joined.
func Narrow[P any](entries []PageEntry, parent []P, bounds func(P) (uint64, uint64)) [][2]uint64 {
	// Where each run with holes starts and ends in parent, to size the
	// result once: it can be hundreds of thousands of ranges.
	at := make([][2]int, len(entries))
	n := len(entries)
	for k, e := range entries {
		if e.Holes {
			i := sort.Search(len(parent), func(i int) bool { _, end := bounds(parent[i]); return end > e.Vaddr })
			j := i + sort.Search(len(parent)-i, func(j int) bool { start, _ := bounds(parent[i+j]); return start >= e.End() })
			at[k] = [2]int{i, j}
			n += j - i
		}
	}
	out := make([][2]uint64, 0, n)
	for k, e := range entries {
		if !e.Holes {
			out = joinRange(out, e.Vaddr, e.End())
			continue
		}
		for _, p := range parent[at[k][0]:at[k][1]] {
			start, end := bounds(p)
			out = joinRange(out, max(start, e.Vaddr), min(end, e.End()))
		}
	}
	return out
}

// RangeBounds and RunBounds are Narrow's bounds for page ranges and for
// runs of page data.
func RangeBounds(r [2]uint64) (uint64, uint64) { return r[0], r[1] }
func RunBounds(r PageRun) (uint64, uint64)     { return r.Vaddr, r.Vaddr + uint64(len(r.Data)) }

// joinRange appends [a, b) to ranges, joining it to the last one if they
// touch.
func joinRange(ranges [][2]uint64, a, b uint64) [][2]uint64 {
	if n := len(ranges); n > 0 && ranges[n-1][1] == a {
		ranges[n-1][1] = b
		return ranges
	}
	return append(ranges, [2]uint64{a, b})
}
