package images

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/images/pb"
)

// newRecord returns an empty message for record i (from 0) of an image of
// kind k, or nil for a kind without records.
func newRecord(k Kind, i int) proto.Message {
	switch k {
	case KindInventory:
		return &pb.Inventory{}
	case KindPstree:
		return &pb.PstreeEntry{}
	case KindCore:
		return &pb.TaskCore{}
	case KindMm:
		return &pb.MmCore{}
	case KindPagemap:
		if i == 0 {
			return &pb.PagemapHead{}
		}
		return &pb.PagemapBatch{}
	case KindFiles:
		return &pb.FileEntry{}
	case KindFdinfo:
		return &pb.FdTable{}
	case KindStats:
		return &pb.Stats{}
	case KindGhost:
		return &pb.GhostFile{}
	}
	return nil
}

// Decoded is one image file ready to print. Its JSON form is
//
//	{"magic": "FERRYIMG", "kind": "core", "version": "1.0", "entries": [...]}
//
// for a record file, each entry a record in the protobuf JSON mapping
// with the field names of ferry.proto, and
//
//	{"magic": "FERRYIMG", "kind": "pages", "version": "1.0", "size": N, "pages": N/4096}
//
// for a pages file, whose data is not printed.
type Decoded struct {
	Header  Header
	Entries []json.RawMessage // record files
	Size    int64             // pages files: bytes of page data
}

func (d *Decoded) MarshalJSON() ([]byte, error) {
	type head struct {
		Magic   string `json:"magic"`
		Kind    string `json:"kind"`
		Version string `json:"version"`
	}
	h := head{Magic, d.Header.Kind.String(), fmt.Sprintf("%d.%d", d.Header.Major, d.Header.Minor)}
	if d.Header.Kind == KindPages {
		return json.Marshal(struct {
			head
			Size  int64 `json:"size"`
			Pages int64 `json:"pages"`
		}{h, d.Size, d.Size / pageSize})
	}
	entries := d.Entries
	if entries == nil {
		entries = []json.RawMessage{}
	}
	return json.Marshal(struct {
		head
		Entries []json.RawMessage `json:"entries"`
	}{h, entries})
}

var jsonOpts = protojson.MarshalOptions{UseProtoNames: true}

// Decode reads the image file at path, of any kind, into its JSON form.
func Decode(path string) (*Decoded, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h, err := readHeader(path, f)
	if err != nil {
		return nil, err
	}
	if h.Kind == KindPages {
		pr, err := newPageReader(path, f)
		if err != nil {
			return nil, err
		}
		return &Decoded{Header: h, Size: pr.Size()}, nil
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	return decodeRecords(path, f)
}

// decodeRecords decodes a record image read from rd.
func decodeRecords(path string, rd io.Reader) (*Decoded, error) {
	r, err := NewReader(path, rd, 0)
	if err != nil {
		return nil, err
	}
	d := &Decoded{Header: r.Header}
	for i := 0; ; i++ {
		m := newRecord(r.Header.Kind, i)
		if err := r.Next(m); errors.Is(err, io.EOF) {
			return d, nil
		} else if err != nil {
			return nil, err
		}
		// Pagemap batches are shown as the entries they hold.
		msgs := []proto.Message{m}
		if b, ok := m.(*pb.PagemapBatch); ok {
			msgs = msgs[:0]
			for k := range b.Vaddr {
				if k < len(b.NrPages) && k < len(b.Flags) {
					msgs = append(msgs, &pb.PagemapEntry{Vaddr: b.Vaddr[k], NrPages: b.NrPages[k], InParent: b.Flags[k]&flagInParent != 0, Holes: b.Flags[k]&flagHoles != 0})
				}
			}
		}
		for _, m := range msgs {
			b, err := jsonOpts.Marshal(m)
			if err != nil {
				return nil, fmt.Errorf("images: %s: record %d to JSON: %w", path, i, err)
			}
			d.Entries = append(d.Entries, b)
		}
	}
}

// Show writes the image file at path, of any kind, as indented JSON (see
// Decoded for the shape).
func Show(w io.Writer, path string) error {
	d, err := Decode(path)
	if err != nil {
		return err
	}
	return writeJSON(w, d)
}

// isImageName tells whether a directory entry's name is an image file's:
// *.img, stats-dump and stats-restore.
func isImageName(name string) bool {
	return strings.HasSuffix(name, ".img") || strings.HasPrefix(name, "stats-")
}

// ShowDir writes every image file of dir (*.img and stats-*) as one JSON
// object keyed by file name, in name order. If any file fails to decode,
// nothing is written and the error names it.
func ShowDir(w io.Writer, dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	out := map[string]*Decoded{} // encoding/json sorts the keys
	for _, e := range ents {
		if e.IsDir() || !isImageName(e.Name()) {
			continue
		}
		d, err := Decode(filepath.Join(dir, e.Name()))
		if err != nil {
			return err
		}
		out[e.Name()] = d
	}
	if len(out) == 0 {
		return fmt.Errorf("images: %s: no image files (*.img, stats-*)", dir)
	}
	return writeJSON(w, out)
}

// writeJSON writes v indented by four spaces, as crit does.
func writeJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "    ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}
