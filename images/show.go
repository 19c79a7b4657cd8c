package images

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/images/pb"
)

// newRecord returns an empty message for the i-th record of a kind.
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
		return &pb.PagemapEntry{}
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

// Decoded is the JSON form of one image file.
type Decoded struct {
	Magic   string            `json:"magic"`
	Kind    string            `json:"kind"`
	Version string            `json:"version"`
	Entries []json.RawMessage `json:"entries,omitempty"`
	// Pages files:
	Size  int64 `json:"size,omitempty"`
	Pages int64 `json:"pages,omitempty"`
}

var jsonOpts = protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: false}

// Decode reads any image file into its JSON form.
func Decode(path string) (*Decoded, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	hb := make([]byte, headerSize)
	n, _ := io.ReadFull(f, hb)
	h, err := ParseHeader(path, hb[:n])
	if err != nil {
		return nil, err
	}
	d := &Decoded{Magic: Magic, Kind: h.Kind.String(), Version: fmt.Sprintf("%d.%d", h.Major, h.Minor)}
	if h.Kind == KindPages {
		pr, err := OpenPages(filepath.Dir(path), filepath.Base(path))
		if err != nil {
			return nil, err
		}
		defer pr.Close()
		d.Size, d.Pages = pr.Size(), pr.Size()/4096
		return d, nil
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	r, err := NewReader(path, f, 0)
	if err != nil {
		return nil, err
	}
	for i := 0; ; i++ {
		m := newRecord(h.Kind, i)
		if err := r.Next(m); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, err
		}
		b, err := jsonOpts.Marshal(m)
		if err != nil {
			return nil, err
		}
		d.Entries = append(d.Entries, b)
	}
	return d, nil
}

// Show writes any image file as indented JSON.
func Show(w io.Writer, path string) error {
	d, err := Decode(path)
	if err != nil {
		return err
	}
	return writeJSON(w, d)
}

// ShowDir writes every image of dir as one JSON object keyed by file name.
func ShowDir(w io.Writer, dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	out := map[string]*Decoded{}
	var names []string
	for _, e := range ents {
		n := e.Name()
		if e.IsDir() || !(strings.HasSuffix(n, ".img") || strings.HasPrefix(n, "stats-")) {
			continue
		}
		d, err := Decode(filepath.Join(dir, n))
		if err != nil {
			return err
		}
		out[n] = d
		names = append(names, n)
	}
	if len(names) == 0 {
		return fmt.Errorf("%s: no image files", dir)
	}
	sort.Strings(names)
	return writeJSON(w, out)
}

func writeJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "    ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}
