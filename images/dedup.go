package images

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
)

// dataRun is a run of pages stored in a pages file: pages [vaddr,
// vaddr+n*4096) at byte off of the data region.
type dataRun struct {
	vaddr, n, off uint64
}

// pagemapRuns reads a pagemap file: the runs stored in its own pages file
// (with their offsets), the pages-file name, and whether it is compressed.
func pagemapRuns(dir, name string) (runs []dataRun, pages string, compressed bool, err error) {
	head, entries, err := readPagemapFile(dir, name)
	if err != nil {
		return nil, "", false, err
	}
	var off uint64
	for _, e := range entries {
		if !e.InParent {
			runs = append(runs, dataRun{vaddr: e.Vaddr, n: uint64(e.NrPages), off: off})
			off += uint64(e.NrPages) * 4096
		}
	}
	return runs, PagesName(head.PagesId), head.Compression != "", nil
}

// Dedup frees, in every ancestor of the image set in dir (its
// --prev-images-dir chain), the page data that dir stores again itself:
// those copies are never read when restoring dir. The ancestors keep
// their size but lose the blocks (hole punching), and can no longer be
// restored on their own. It returns the bytes freed.
func Dedup(dir string) (int64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var freed int64
	for _, e := range ents {
		name := e.Name()
		if !strings.HasPrefix(name, "pagemap-") || !strings.HasSuffix(name, ".img") {
			continue
		}
		own, _, _, err := pagemapRuns(dir, name)
		if err != nil {
			return freed, err
		}
		n, err := dedupAncestors(dir, name, own, 0)
		freed += n
		if err != nil {
			return freed, err
		}
	}
	return freed, nil
}

// ParentDir returns the parent image set of the one in dir (its
// --prev-images-dir, resolved against dir), "" if it has none.
func ParentDir(dir string) (string, error) {
	inv := &pb.Inventory{}
	if err := ReadOne(dir, InventoryName, KindInventory, inv); err != nil {
		return "", err
	}
	if inv.ParentDir == "" || filepath.IsAbs(inv.ParentDir) {
		return inv.ParentDir, nil
	}
	return filepath.Join(dir, inv.ParentDir), nil
}

func dedupAncestors(dir, pagemap string, stored []dataRun, depth int) (int64, error) {
	if depth > 64 {
		return 0, fmt.Errorf("%s: parent chain longer than 64", dir)
	}
	pdir, err := ParentDir(dir)
	if err != nil || pdir == "" {
		return 0, err
	}
	if _, err := os.Stat(filepath.Join(pdir, pagemap)); err != nil {
		return 0, nil // the chain ends here for this process
	}
	runs, pages, compressed, err := pagemapRuns(pdir, pagemap)
	if err != nil {
		return 0, err
	}
	if compressed {
		// A zstd stream has no page-aligned holes to punch: keep it, and
		// go on with the ancestors behind it.
		return dedupAncestors(pdir, pagemap, stored, depth+1)
	}
	f, err := os.OpenFile(filepath.Join(pdir, pages), os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var freed int64
	for _, s := range overlaps(stored, runs) {
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE,
			int64(PageDataOffset+s.off), int64(s.n*4096)); err != nil {
			return freed, fmt.Errorf("punch %s at %d: %w", f.Name(), PageDataOffset+s.off, os.NewSyscallError("fallocate", err))
		}
		freed += int64(s.n * 4096)
	}
	n, err := dedupAncestors(pdir, pagemap, stored, depth+1)
	return freed + n, err
}

// overlaps returns the parts of runs (with their file offsets) whose
// pages are also in stored.
func overlaps(stored, runs []dataRun) []dataRun {
	sort.Slice(stored, func(i, j int) bool { return stored[i].vaddr < stored[j].vaddr })
	var out []dataRun
	for _, r := range runs {
		rEnd := r.vaddr + r.n*4096
		i := sort.Search(len(stored), func(i int) bool { return stored[i].vaddr+stored[i].n*4096 > r.vaddr })
		for ; i < len(stored) && stored[i].vaddr < rEnd; i++ {
			a := max(stored[i].vaddr, r.vaddr)
			b := min(stored[i].vaddr+stored[i].n*4096, rEnd)
			if b > a {
				out = append(out, dataRun{vaddr: a, n: (b - a) / 4096, off: r.off + (a - r.vaddr)})
			}
		}
	}
	return out
}
