package images

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/images/pb"
)

func writeSample(t *testing.T, dir string) string {
	t.Helper()
	core := &pb.TaskCore{Pid: 42, Comm: "worker", Threads: []*pb.ThreadCore{{Tid: 42, Xstate: bytes.Repeat([]byte{7}, 100)}}}
	if err := WriteAll(dir, "core-42.img", KindCore, core, &pb.TaskCore{Pid: 43}); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "core-42.img")
}

func TestRoundTrip(t *testing.T) {
	dir := t.TempDir()
	writeSample(t, dir)
	r, err := Open(dir, "core-42.img", KindCore)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var got []*pb.TaskCore
	for {
		m := &pb.TaskCore{}
		if err := r.Next(m); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		got = append(got, m)
	}
	if len(got) != 2 || got[0].Comm != "worker" || got[1].Pid != 43 || len(got[0].Threads[0].Xstate) != 100 {
		t.Fatalf("got %v", got)
	}
}

func TestEveryKindShows(t *testing.T) {
	dir := t.TempDir()
	msgs := map[string]struct {
		k Kind
		m []proto.Message
	}{
		"inventory.img": {KindInventory, []proto.Message{&pb.Inventory{FormatMajor: 1, RootPid: 5}}},
		"pstree.img":    {KindPstree, []proto.Message{&pb.PstreeEntry{Pid: 5, Threads: []int32{5, 6}}}},
		"core-5.img":    {KindCore, []proto.Message{&pb.TaskCore{Pid: 5}}},
		"mm-5.img":      {KindMm, []proto.Message{&pb.MmCore{Pid: 5, Vmas: []*pb.Vma{{Start: 4096, End: 8192, Kind: "anon"}}}}},
		"pagemap-5.img": {KindPagemap, []proto.Message{&pb.PagemapHead{PagesId: 5}, &pb.PagemapEntry{Vaddr: 4096, NrPages: 1}}},
		"files.img":     {KindFiles, []proto.Message{&pb.FileEntry{Id: 1, Path: "/x"}}},
		"fdinfo-5.img":  {KindFdinfo, []proto.Message{&pb.FdTable{Pid: 5}}},
		"stats-dump":    {KindStats, []proto.Message{&pb.Stats{Dump: &pb.DumpStats{PagesWritten: 1}}}},
		"ghost-1.img":   {KindGhost, []proto.Message{&pb.GhostFile{Id: 1, Data: []byte("x")}}},
	}
	for name, v := range msgs {
		if err := WriteAll(dir, name, v.k, v.m...); err != nil {
			t.Fatal(err)
		}
	}
	pw, err := CreatePages(dir, "pages-5.img")
	if err != nil {
		t.Fatal(err)
	}
	pw.Write(make([]byte, 8192))
	pw.Close()
	var out bytes.Buffer
	if err := ShowDir(&out, dir); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"pages-5.img"`, `"pages": 2`, `"nr_pages": 1`, `"kind": "pagemap"`, `"comm"`[:0] + `"root_pid": 5`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("show output lacks %s:\n%s", want, out.String())
		}
	}
}

func TestTruncatedEverywhere(t *testing.T) {
	dir := t.TempDir()
	path := writeSample(t, dir)
	full, _ := os.ReadFile(path)
	for cut := 0; cut < len(full); cut++ {
		if err := os.WriteFile(path, full[:cut], 0o600); err != nil {
			t.Fatal(err)
		}
		err := readAll(dir)
		if err == nil {
			// A cut exactly between records is a valid shorter file.
			continue
		}
		var fe *FormatError
		if !errors.As(err, &fe) || !(errors.Is(err, ErrTruncated) || errors.Is(err, ErrCorrupt)) {
			t.Fatalf("cut at %d: %v", cut, err)
		}
		if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "offset") {
			t.Fatalf("cut at %d: error does not name file and offset: %v", cut, err)
		}
	}
}

func readAll(dir string) error {
	r, err := Open(dir, "core-42.img", KindCore)
	if err != nil {
		return err
	}
	defer r.Close()
	for {
		if err := r.Next(&pb.TaskCore{}); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return err
		}
	}
}

func TestBitFlip(t *testing.T) {
	dir := t.TempDir()
	path := writeSample(t, dir)
	full, _ := os.ReadFile(path)
	for i := headerSize; i < len(full); i++ {
		b := append([]byte(nil), full...)
		b[i] ^= 0x10
		os.WriteFile(path, b, 0o600)
		if err := readAll(dir); err == nil {
			t.Fatalf("flip at %d not detected", i)
		} else if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrTruncated) {
			t.Fatalf("flip at %d: %v", i, err)
		}
	}
}

func TestFutureVersionAndKind(t *testing.T) {
	dir := t.TempDir()
	path := writeSample(t, dir)
	b, _ := os.ReadFile(path)
	b[12] = FormatMajor + 1
	os.WriteFile(path, b, 0o600)
	_, err := Open(dir, "core-42.img", KindCore)
	if !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), "format version 2.0") {
		t.Fatalf("future version: %v", err)
	}
	writeSample(t, dir)
	if _, err := Open(dir, "core-42.img", KindMm); !errors.Is(err, ErrKind) {
		t.Fatalf("wrong kind: %v", err)
	}
	os.WriteFile(path, []byte("NOTANIMAGE123456"), 0o600)
	if _, err := Open(dir, "core-42.img", KindCore); !errors.Is(err, ErrBadMagic) {
		t.Fatalf("bad magic: %v", err)
	}
}

func TestHugeLengthDoesNotAllocate(t *testing.T) {
	dir := t.TempDir()
	path := writeSample(t, dir)
	b, _ := os.ReadFile(path)
	b = b[:headerSize+8]
	b[headerSize], b[headerSize+1], b[headerSize+2], b[headerSize+3] = 0xff, 0xff, 0xff, 0x0f // 255 MiB
	os.WriteFile(path, b, 0o600)
	if err := readAll(dir); !errors.Is(err, ErrTruncated) {
		t.Fatalf("huge length: %v", err)
	}
}

func TestPages(t *testing.T) {
	dir := t.TempDir()
	w, err := CreatePages(dir, "pages-1.img")
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{1, 2, 3, 4}, 2048)
	w.Write(data)
	if w.Offset() != 8192 {
		t.Fatalf("offset %d", w.Offset())
	}
	w.Close()
	r, err := OpenPages(dir, "pages-1.img")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	m, err := r.Bytes()
	if err != nil || !bytes.Equal(m, data) {
		t.Fatalf("mmap: %v", err)
	}
	buf := make([]byte, 4)
	if _, err := r.ReadAt(buf, 8190); !errors.Is(err, ErrTruncated) {
		t.Fatalf("read past end: %v", err)
	}
}
