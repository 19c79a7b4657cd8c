package restorecore

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sort"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
)

// pageRun is page data ready to copy: pages [vaddr, vaddr+len(data)).
type pageRun struct {
	vaddr uint64
	data  []byte
}

// maxChain bounds the parent chain of an incremental image set.
const maxChain = 64

// pageChain resolves the memory of process pid in an image directory into
// runs of page data, following in_parent entries through the parent
// image sets (--prev-images-dir). The returned closers keep the page
// files mapped.
type pageChain struct {
	closers []io.Closer
}

func (c *pageChain) close() {
	for _, cl := range c.closers {
		cl.Close()
	}
}

// resolve returns the runs of dir's pagemap for pid, sorted by address.
func (c *pageChain) resolve(dir string, pid int32, depth int) ([]pageRun, error) {
	if depth > maxChain {
		return nil, fmt.Errorf("%s: parent image chain longer than %d", dir, maxChain)
	}
	name := fmt.Sprintf("pagemap-%d.img", pid)
	r, err := images.Open(dir, name, images.KindPagemap)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	head := &pb.PagemapHead{}
	if err := r.Next(head); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%s: missing head: %w", filepath.Join(dir, name), images.ErrTruncated)
		}
		return nil, err
	}
	if head.Compression != "" {
		return nil, fmt.Errorf("%s: page compression %q is not supported by this ferry: %w", filepath.Join(dir, name), head.Compression, images.ErrVersion)
	}
	var entries []*pb.PagemapEntry
	var prevEnd uint64
	needParent := false
	for {
		e := &pb.PagemapEntry{}
		if err := r.Next(e); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, err
		}
		if e.Vaddr%pageSize != 0 || e.NrPages == 0 || e.Vaddr < prevEnd {
			return nil, fmt.Errorf("%s: bad pagemap entry %#x+%d at offset %d: %w", filepath.Join(dir, name), e.Vaddr, e.NrPages, r.Offset(), images.ErrCorrupt)
		}
		prevEnd = e.Vaddr + uint64(e.NrPages)*pageSize
		needParent = needParent || e.InParent
		entries = append(entries, e)
	}
	var data []byte
	pagesName := fmt.Sprintf("pages-%d.img", head.PagesId)
	pr, err := images.OpenPages(dir, pagesName)
	if err != nil {
		return nil, err
	}
	c.closers = append(c.closers, pr)
	if data, err = pr.Bytes(); err != nil {
		return nil, err
	}
	var parent []pageRun
	if needParent {
		inv := &pb.Inventory{}
		if err := images.ReadOne(dir, "inventory.img", images.KindInventory, inv); err != nil {
			return nil, err
		}
		if inv.ParentDir == "" {
			return nil, fmt.Errorf("%s has pages in a parent image but names no parent directory: %w", filepath.Join(dir, name), images.ErrCorrupt)
		}
		pdir := inv.ParentDir
		if !filepath.IsAbs(pdir) {
			pdir = filepath.Join(dir, pdir)
		}
		if parent, err = c.resolve(pdir, pid, depth+1); err != nil {
			return nil, fmt.Errorf("parent images of %s: %w", dir, err)
		}
	}
	var out []pageRun
	var off uint64
	for _, e := range entries {
		n := uint64(e.NrPages) * pageSize
		if !e.InParent {
			if off+n > uint64(len(data)) {
				return nil, fmt.Errorf("%s: pagemap wants %d bytes at offset %d, file has %d: %w",
					filepath.Join(dir, pagesName), n, off, len(data), images.ErrTruncated)
			}
			out = append(out, pageRun{vaddr: e.Vaddr, data: data[off : off+n]})
			off += n
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
			filepath.Join(dir, pagesName), len(data), off, images.ErrCorrupt)
	}
	return out, nil
}

// cut returns the parts of runs covering [start, end), which must be
// covered completely.
func cut(runs []pageRun, start, end uint64) ([]pageRun, error) {
	i := sort.Search(len(runs), func(i int) bool { return runs[i].vaddr+uint64(len(runs[i].data)) > start })
	var out []pageRun
	at := start
	for ; i < len(runs) && at < end; i++ {
		r := runs[i]
		if r.vaddr > at {
			break
		}
		s := at - r.vaddr
		e := min(uint64(len(r.data)), end-r.vaddr)
		out = append(out, pageRun{vaddr: at, data: r.data[s:e]})
		at = r.vaddr + e
	}
	if at < end {
		return nil, fmt.Errorf("page %#x is marked in the parent image, which does not have it: %w", at, images.ErrCorrupt)
	}
	return out, nil
}
