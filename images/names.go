package images

import "strconv"

// Names of the image files in an image directory. Files of one process
// carry its PID; pages and ghost files carry the id that the pagemap head
// (PagemapHead.pages_id) or the file entry (FileEntry.id) names.
const (
	InventoryName    = "inventory.img" // KindInventory, one record
	PstreeName       = "pstree.img"    // KindPstree, one record per process
	FilesName        = "files.img"     // KindFiles, one record per open file
	StatsDumpName    = "stats-dump"    // KindStats, one record
	StatsRestoreName = "stats-restore" // KindStats, one record
	IpcName          = "ipc.img"       // KindIpc, one record per SysV object
)

// ID is what image file names are numbered by: PIDs (int, or pb's int32)
// and file or pages ids (pb's uint32).
type ID interface {
	~int | ~int32 | ~int64 | ~uint32 | ~uint64
}

func numbered[T ID](prefix string, n T) string {
	var s string
	if n < 0 {
		s = strconv.FormatInt(int64(n), 10)
	} else {
		s = strconv.FormatUint(uint64(n), 10)
	}
	return prefix + "-" + s + ".img"
}

// CoreName is core-<pid>.img, KindCore, one record.
func CoreName[T ID](pid T) string { return numbered("core", pid) }

// MmName is mm-<pid>.img, KindMm, one record.
func MmName[T ID](pid T) string { return numbered("mm", pid) }

// PagemapName is pagemap-<pid>.img, KindPagemap: a PagemapHead record,
// then PagemapBatch records (ReadPagemap, WritePagemap).
func PagemapName[T ID](pid T) string { return numbered("pagemap", pid) }

// PagesName is pages-<id>.img, KindPages: raw page data, no records.
func PagesName[T ID](id T) string { return numbered("pages", id) }

// FdinfoName is fdinfo-<pid>.img, KindFdinfo, one record.
func FdinfoName[T ID](pid T) string { return numbered("fdinfo", pid) }

// GhostName is ghost-<id>.img, KindGhost, one record: the contents of
// the deleted file FileEntry id.
func GhostName[T ID](id T) string { return numbered("ghost", id) }
