package images

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"
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
		inv := &pb.Inventory{}
		if err := ReadOne(dir, InventoryName, KindInventory, inv); err != nil {
			return nil, err
		}
		if inv.ParentDir == "" {
			return nil, fmt.Errorf("%s has pages in a parent image but names no parent directory: %w", filepath.Join(dir, name), ErrCorrupt)
		}
		pdir := inv.ParentDir
		if !filepath.IsAbs(pdir) {
			pdir = filepath.Join(dir, pdir)
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
		runs, err := cut(parent, e.Vaddr, e.Vaddr+n)
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

// cut returns the parts of runs covering [start, end), which must be
// covered completely.
func cut(runs []PageRun, start, end uint64) ([]PageRun, error) {
	i := sort.Search(len(runs), func(i int) bool { return runs[i].Vaddr+uint64(len(runs[i].Data)) > start })
	var out []PageRun
	at := start
	for ; i < len(runs) && at < end; i++ {
		r := runs[i]
		if r.Vaddr > at {
			break
		}
		s := at - r.Vaddr
		e := min(uint64(len(r.Data)), end-r.Vaddr)
		out = append(out, PageRun{Vaddr: at, Data: r.Data[s:e]})
		at = r.Vaddr + e
	}
	if at < end {
		return nil, fmt.Errorf("page %#x is marked in the parent image, which does not have it: %w", at, ErrCorrupt)
	}
	return out, nil
}

// PagemapRanges returns every page range the pagemap of pid in dir
// describes (stored there or in a parent), without reading page data: the
// pages the process had at the dump.
func PagemapRanges(dir string, pid int32) ([][2]uint64, error) {
	_, entries, err := ReadPagemap(dir, pid)
	if err != nil {
		return nil, err
	}
	return Ranges(entries), nil
}

// Ranges returns the page ranges of entries.
func Ranges(entries []PageEntry) [][2]uint64 {
	out := make([][2]uint64, len(entries))
	for i, e := range entries {
		out[i] = [2]uint64{e.Vaddr, e.End()}
	}
	return out
}

// PagemapSplit returns, for pagemap entries of dir, the ranges stored by
// this image set itself (own) and those it takes from its parents
// (inherited), and the parent directory (resolved against dir).
func PagemapSplit(dir string, entries []PageEntry) (own, inherited [][2]uint64, parent string, err error) {
	for _, e := range entries {
		rg := [2]uint64{e.Vaddr, e.End()}
		if e.InParent {
			inherited = append(inherited, rg)
		} else {
			own = append(own, rg)
		}
	}
	if len(inherited) > 0 {
		inv := &pb.Inventory{}
		if err := ReadOne(dir, InventoryName, KindInventory, inv); err != nil {
			return nil, nil, "", err
		}
		parent = inv.ParentDir
		if parent != "" && !filepath.IsAbs(parent) {
			parent = filepath.Join(dir, parent)
		}
	}
	return own, inherited, parent, nil
}
