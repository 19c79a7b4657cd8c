package images

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/images/pb"
)

// noFDLeak fails t if the test ends with more open fds than it began with.
func noFDLeak(t *testing.T) {
	t.Helper()
	count := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	before := count()
	t.Cleanup(func() {
		if after := count(); after != before {
			t.Errorf("%d fds open before the test, %d after", before, after)
		}
	})
}

// sample is one image of every kind with records.
var sample = []struct {
	name string
	kind Kind
	msgs []proto.Message
}{
	{InventoryName, KindInventory, []proto.Message{&pb.Inventory{
		FormatMajor: FormatMajor, RootPid: 42, KernelRelease: "6.8.0", PageSize: 4096,
		VdsoLayout: []*pb.SpecialVma{{Name: "[vvar]", Size: 16384}, {Name: "[vdso]", Size: 8192}},
		VdsoSha256: bytes.Repeat([]byte{0xab}, 32),
	}}},
	{PstreeName, KindPstree, []proto.Message{
		&pb.PstreeEntry{Pid: 42, Ppid: 1, Pgid: 42, Sid: 42, Threads: []int32{42, 43}},
		&pb.PstreeEntry{Pid: 44, Ppid: 42, Threads: []int32{44}},
	}},
	{CoreName(42), KindCore, []proto.Message{&pb.TaskCore{
		Pid: 42, Comm: "worker", Creds: &pb.Creds{Uid: 1000, Groups: []uint32{4, 24}},
		Rlimits: []*pb.Rlimit{{Resource: 7, Cur: 1024, Max: ^uint64(0)}},
		Threads: []*pb.ThreadCore{
			{Tid: 42, Regs: &pb.GpRegs{Rip: 0x401000, Rsp: 0x7ffc0000}, Xstate: bytes.Repeat([]byte{7}, 100)},
			{Tid: 43, Pending: []*pb.SigInfo{{Signo: 10, Raw: make([]byte, 128)}}},
		},
	}}},
	{MmName(42), KindMm, []proto.Message{&pb.MmCore{
		Pid: 42, Brk: 0x600000, Auxv: []uint64{6, 4096, 0, 0},
		Vmas: []*pb.Vma{{Start: 0x400000, End: 0x401000, Prot: 5, Kind: "file", Name: "/bin/x", FileId: 3}},
	}}},
	{PagemapName(42), KindPagemap, []proto.Message{
		&pb.PagemapHead{PagesId: 42},
		&pb.PagemapBatch{Vaddr: []uint64{0x400000, 0x600000}, NrPages: []uint32{1, 16}, Flags: []uint32{0, 1}},
	}},
	{FilesName, KindFiles, []proto.Message{
		&pb.FileEntry{Id: 1, Type: "reg", Path: "/tmp/log", Flags: 1, Pos: 77},
		&pb.FileEntry{Id: 2, Type: "chr", Path: "/dev/null", Ghost: false},
	}},
	{FdinfoName(42), KindFdinfo, []proto.Message{&pb.FdTable{Pid: 42, Fds: []*pb.FdEntry{{Fd: 0, FileId: 2}, {Fd: 3, FileId: 1, Cloexec: true}}}}},
	{StatsDumpName, KindStats, []proto.Message{&pb.Stats{Dump: &pb.DumpStats{PagesWritten: 17, FrozenTimeUs: 900}}}},
	{StatsRestoreName, KindStats, []proto.Message{&pb.Stats{Restore: &pb.RestoreStats{PagesRestored: 17}}}},
	{GhostName(uint32(5)), KindGhost, []proto.Message{&pb.GhostFile{Id: 5, Mode: 0o100644, Size: 3, Data: []byte("abc")}}},
}

func writeSamples(t *testing.T, dir string) {
	t.Helper()
	for _, s := range sample {
		if err := WriteAll(dir, s.name, s.kind, s.msgs...); err != nil {
			t.Fatal(err)
		}
	}
}

// readRecords reads every record of dir/name, an image of kind.
func readRecords(dir, name string, kind Kind) ([]proto.Message, error) {
	r, err := Open(dir, name, kind)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	var out []proto.Message
	for i := 0; ; i++ {
		m := newRecord(kind, i)
		if err := r.Next(m); errors.Is(err, io.EOF) {
			return out, nil
		} else if err != nil {
			return out, err
		}
		out = append(out, m)
	}
}

func TestRoundTripEveryKind(t *testing.T) {
	noFDLeak(t)
	dir := t.TempDir()
	writeSamples(t, dir)
	for _, s := range sample {
		got, err := readRecords(dir, s.name, s.kind)
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if len(got) != len(s.msgs) {
			t.Fatalf("%s: %d records, want %d", s.name, len(got), len(s.msgs))
		}
		for i := range got {
			if !proto.Equal(got[i], s.msgs[i]) {
				t.Errorf("%s record %d: got %v, want %v", s.name, i, got[i], s.msgs[i])
			}
		}
		if len(s.msgs) == 1 {
			m := newRecord(s.kind, 0)
			if err := ReadOne(dir, s.name, s.kind, m); err != nil || !proto.Equal(m, s.msgs[0]) {
				t.Errorf("ReadOne %s: %v, %v", s.name, m, err)
			}
		}
	}
}

func TestWriterStream(t *testing.T) {
	var buf closeBuffer
	w, err := NewWriter(&buf, KindPstree)
	if err != nil {
		t.Fatal(err)
	}
	for pid := int32(1); pid <= 3; pid++ {
		if err := w.Write(&pb.PstreeEntry{Pid: pid}); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil || !buf.closed {
		t.Fatalf("close: %v, closed %v", err, buf.closed)
	}
	r, err := NewReader("stream", bytes.NewReader(buf.Bytes()), KindPstree)
	if err != nil {
		t.Fatal(err)
	}
	for want := int32(1); ; want++ {
		var e pb.PstreeEntry
		if err := r.Next(&e); errors.Is(err, io.EOF) {
			if want != 4 {
				t.Fatalf("EOF after %d records", want-1)
			}
			break
		} else if err != nil || e.Pid != want {
			t.Fatalf("record %d: %v %v", want, &e, err)
		}
	}
	if r.Offset() != int64(buf.Len()) {
		t.Fatalf("offset %d at the end of %d bytes", r.Offset(), buf.Len())
	}
}

type closeBuffer struct {
	bytes.Buffer
	closed bool
}

func (b *closeBuffer) Close() error { b.closed = true; return nil }

func TestNames(t *testing.T) {
	for got, want := range map[string]string{
		CoreName(42):                  "core-42.img",
		MmName(int32(7)):              "mm-7.img",
		PagemapName(int64(1) << 40):   "pagemap-1099511627776.img",
		PagesName(uint32(4294967295)): "pages-4294967295.img",
		FdinfoName(1):                 "fdinfo-1.img",
		GhostName(uint64(9)):          "ghost-9.img",
		CoreName(-1):                  "core--1.img",
	} {
		if got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
}

func TestKindString(t *testing.T) {
	for k, want := range map[Kind]string{KindInventory: "inventory", KindPagemap: "pagemap", KindGhost: "ghost", 0: "kind(0)", 99: "kind(99)"} {
		if got := k.String(); got != want {
			t.Errorf("%d: %q, want %q", uint32(k), got, want)
		}
	}
}

// mustFormatErr returns err as a *FormatError naming path, or fails.
func mustFormatErr(t *testing.T, err error, path string) *FormatError {
	t.Helper()
	var fe *FormatError
	if !errors.As(err, &fe) {
		t.Fatalf("%v (%T) is not a *FormatError", err, err)
	}
	if fe.Path != path || !strings.HasPrefix(err.Error(), "images: "+path+": offset ") {
		t.Fatalf("error does not name %s and an offset: %v", path, err)
	}
	return fe
}

// TestTruncatedEverywhere cuts a record file at every byte: each cut is
// either a clean end between records or ErrTruncated at the cut.
func TestTruncatedEverywhere(t *testing.T) {
	noFDLeak(t)
	dir := t.TempDir()
	writeSamples(t, dir)
	for _, s := range sample {
		path := filepath.Join(dir, s.name)
		full, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		boundaries := recordStarts(t, full)
		for cut := 0; cut < len(full); cut++ {
			if err := os.WriteFile(path, full[:cut], 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := readRecords(dir, s.name, s.kind)
			_, derr := Decode(path)
			if boundaries[int64(cut)] {
				if err != nil || derr != nil {
					t.Fatalf("%s cut at record boundary %d: %v / %v", s.name, cut, err, derr)
				}
				if len(got) >= len(s.msgs) {
					t.Fatalf("%s cut at %d: all %d records read", s.name, cut, len(got))
				}
				continue
			}
			for _, err := range []error{err, derr} {
				fe := mustFormatErr(t, err, path)
				if !errors.Is(err, ErrTruncated) || fe.Offset != int64(cut) {
					t.Fatalf("%s cut at %d: %v", s.name, cut, err)
				}
			}
		}
		if len(s.msgs) == 1 {
			os.WriteFile(path, full[:headerSize], 0o600)
			err := ReadOne(dir, s.name, s.kind, newRecord(s.kind, 0))
			if fe := mustFormatErr(t, err, path); !errors.Is(err, ErrTruncated) || fe.Offset != headerSize {
				t.Fatalf("%s with no record: %v", s.name, err)
			}
		}
	}
}

// recordStarts returns the offsets at which the records of a well-formed
// image start, and its end.
func recordStarts(t *testing.T, b []byte) map[int64]bool {
	out := map[int64]bool{}
	off := int64(headerSize)
	for off < int64(len(b)) {
		out[off] = true
		off += recordHead + int64(binary.LittleEndian.Uint32(b[off:]))
	}
	if off != int64(len(b)) {
		t.Fatalf("records end at %d, file at %d", off, len(b))
	}
	return out
}

// recordAt returns the start of the record holding byte i.
func recordAt(b []byte, i int64) int64 {
	off := int64(headerSize)
	for {
		next := off + recordHead + int64(binary.LittleEndian.Uint32(b[off:]))
		if i < next {
			return off
		}
		off = next
	}
}

// TestBitFlip flips every bit after the header: each flip is ErrCorrupt at
// the start of its record, or, when it makes a length larger than the
// file, ErrTruncated at the end of the file.
func TestBitFlip(t *testing.T) {
	noFDLeak(t)
	dir := t.TempDir()
	writeSamples(t, dir)
	for _, s := range sample {
		path := filepath.Join(dir, s.name)
		full, _ := os.ReadFile(path)
		for i := int64(headerSize); i < int64(len(full)); i++ {
			for bit := range 8 {
				b := bytes.Clone(full)
				b[i] ^= 1 << bit
				if err := os.WriteFile(path, b, 0o600); err != nil {
					t.Fatal(err)
				}
				_, err := readRecords(dir, s.name, s.kind)
				if err == nil {
					t.Fatalf("%s: flip of bit %d at %d not detected", s.name, bit, i)
				}
				fe := mustFormatErr(t, err, path)
				switch {
				case errors.Is(err, ErrCorrupt) && fe.Offset == recordAt(full, i):
				case errors.Is(err, ErrTruncated) && fe.Offset == int64(len(b)):
				default:
					t.Fatalf("%s: flip of bit %d at %d (record at %d): %v", s.name, bit, i, recordAt(full, i), err)
				}
			}
		}
		os.WriteFile(path, full, 0o600)
	}
}

func TestChecksumMessage(t *testing.T) {
	dir := t.TempDir()
	writeSamples(t, dir)
	path := filepath.Join(dir, CoreName(42))
	b, _ := os.ReadFile(path)
	b[len(b)-1] ^= 1
	os.WriteFile(path, b, 0o600)
	err := ReadOne(dir, CoreName(42), KindCore, &pb.TaskCore{})
	want := "images: " + path + ": offset 16: record checksum mismatch (corrupt image)"
	if err == nil || err.Error() != want || !errors.Is(err, ErrCorrupt) {
		t.Fatalf("got %v\nwant %s", err, want)
	}
}

// TestUndecodable: a record with a valid checksum that is not protobuf.
func TestUndecodable(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, MmName(1))
	bad := []byte{0xff, 0xff, 0xff} // field 0x1fff..., truncated varint
	b := encodeHeader(KindMm)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(bad)))
	b = binary.LittleEndian.AppendUint32(b, crc32c(bad))
	b = append(b, bad...)
	os.WriteFile(path, b, 0o600)
	err := ReadOne(dir, MmName(1), KindMm, &pb.MmCore{})
	if fe := mustFormatErr(t, err, path); !errors.Is(err, ErrCorrupt) || fe.Offset != headerSize || !strings.Contains(err.Error(), "MmCore") {
		t.Fatalf("undecodable record: %v", err)
	}
}

func TestHeaderErrors(t *testing.T) {
	noFDLeak(t)
	dir := t.TempDir()
	writeSamples(t, dir)
	name := CoreName(42)
	path := filepath.Join(dir, name)
	good, _ := os.ReadFile(path)
	edit := func(f func(b []byte)) {
		b := bytes.Clone(good)
		f(b)
		os.WriteFile(path, b, 0o600)
	}
	check := func(what string, err, sentinel error, off int64, text string) {
		t.Helper()
		fe := mustFormatErr(t, err, path)
		if !errors.Is(err, sentinel) || fe.Offset != off || !strings.Contains(err.Error(), text) {
			t.Errorf("%s: %v", what, err)
		}
	}

	edit(func(b []byte) { binary.LittleEndian.PutUint16(b[12:], FormatMajor+1) })
	_, err := Open(dir, name, KindCore)
	check("future major", err, ErrVersion, 12, fmt.Sprintf("format version %d.%d is newer than this ferry supports (%d.x); upgrade ferry", FormatMajor+1, FormatMinor, FormatMajor))
	_, err = Decode(path)
	check("future major, show", err, ErrVersion, 12, "upgrade ferry")

	edit(func(b []byte) { binary.LittleEndian.PutUint16(b[12:], 0) })
	_, err = Open(dir, name, KindCore)
	check("older major", err, ErrVersion, 12, fmt.Sprintf("format version 0.%d is older", FormatMinor))

	edit(func(b []byte) { binary.LittleEndian.PutUint16(b[14:], 7) })
	if _, err := readRecords(dir, name, KindCore); err != nil {
		t.Errorf("newer minor version refused: %v", err)
	}

	edit(func([]byte) {})
	_, err = Open(dir, name, KindMm)
	check("wrong kind", err, ErrKind, 8, "holds core, want mm")
	_, err = OpenPages(dir, name)
	check("records as pages", err, ErrKind, 8, "want pages")

	edit(func(b []byte) { binary.LittleEndian.PutUint32(b[8:], 1000) })
	_, err = Open(dir, name, 0)
	check("unknown kind", err, ErrKind, 8, "unknown kind 1000")

	edit(func(b []byte) { copy(b, "CRIUIMG!") })
	_, err = Open(dir, name, KindCore)
	check("bad magic", err, ErrBadMagic, 0, "not a ferry image")
	_, err = OpenPages(dir, name)
	check("bad magic, pages", err, ErrBadMagic, 0, "not a ferry image")

	pw, err := CreatePages(dir, PagesName(1))
	if err != nil {
		t.Fatal(err)
	}
	pw.Close()
	_, err = Open(dir, PagesName(1), 0)
	if fe := mustFormatErr(t, err, filepath.Join(dir, PagesName(1))); !errors.Is(err, ErrKind) || fe.Offset != 8 {
		t.Errorf("pages as records: %v", err)
	}
}

func TestLengthBounds(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.img")
	withLength := func(n uint32) {
		b := binary.LittleEndian.AppendUint32(encodeHeader(KindCore), n)
		b = binary.LittleEndian.AppendUint32(b, 0)
		os.WriteFile(path, append(b, "short"...), 0o600)
	}

	withLength(MaxRecord + 1)
	_, err := readRecords(dir, "x.img", KindCore)
	if fe := mustFormatErr(t, err, path); !errors.Is(err, ErrCorrupt) || fe.Offset != headerSize {
		t.Fatalf("length over the limit: %v", err)
	}

	// The largest valid length in a 29-byte file must cost one bounded
	// chunk, not 256 MiB.
	withLength(MaxRecord)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err = readRecords(dir, "x.img", KindCore)
	runtime.ReadMemStats(&after)
	if fe := mustFormatErr(t, err, path); !errors.Is(err, ErrTruncated) || fe.Offset != headerSize+recordHead+5 {
		t.Fatalf("length past the end: %v", err)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 4*readChunk {
		t.Fatalf("reading a lying length allocated %d bytes", n)
	}
}

func TestStickyError(t *testing.T) {
	dir := t.TempDir()
	writeSamples(t, dir)
	path := filepath.Join(dir, PstreeName)
	b, _ := os.ReadFile(path)
	b[headerSize+recordHead] ^= 1 // first record's payload
	os.WriteFile(path, b, 0o600)
	r, err := Open(dir, PstreeName, KindPstree)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	first := r.Next(&pb.PstreeEntry{})
	if !errors.Is(first, ErrCorrupt) {
		t.Fatal(first)
	}
	if again := r.Next(&pb.PstreeEntry{}); again != first {
		t.Fatalf("after an error, Next read on: %v", again)
	}
}

func TestReadOneMoreThanOne(t *testing.T) {
	noFDLeak(t)
	dir := t.TempDir()
	writeSamples(t, dir)
	path := filepath.Join(dir, PstreeName)
	b, _ := os.ReadFile(path)
	second := recordAt(b, int64(len(b))-1)
	err := ReadOne(dir, PstreeName, KindPstree, &pb.PstreeEntry{})
	if fe := mustFormatErr(t, err, path); !errors.Is(err, ErrCorrupt) || fe.Offset != second {
		t.Fatalf("two records: %v", err)
	}
	// A bad second record is reported as what it is.
	b[len(b)-1] ^= 1
	os.WriteFile(path, b, 0o600)
	err = ReadOne(dir, PstreeName, KindPstree, &pb.PstreeEntry{})
	if fe := mustFormatErr(t, err, path); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "checksum") || fe.Offset != second {
		t.Fatalf("bad second record: %v", err)
	}
}

func TestPages(t *testing.T) {
	noFDLeak(t)
	dir := t.TempDir()
	w, err := CreatePages(dir, PagesName(1))
	if err != nil {
		t.Fatal(err)
	}
	page := func(v byte) []byte { return bytes.Repeat([]byte{v}, pageSize) }
	var want []byte
	for v := range byte(3) {
		n, err := w.Write(page(v))
		if err != nil || n != pageSize {
			t.Fatalf("write: %d %v", n, err)
		}
		want = append(want, page(v)...)
	}
	if n, err := w.WriteVec([][]byte{page(3), page(4)}); err != nil || n != 2*pageSize {
		t.Fatalf("writev: %d %v", n, err)
	}
	want = append(want, page(3)...)
	want = append(want, page(4)...)
	if w.Offset() != int64(len(want)) {
		t.Fatalf("offset %d, want %d", w.Offset(), len(want))
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}

	raw, _ := os.ReadFile(filepath.Join(dir, PagesName(1)))
	if len(raw) != PageDataOffset+len(want) || !bytes.Equal(raw[headerSize:PageDataOffset], make([]byte, PageDataOffset-headerSize)) {
		t.Fatalf("pages file layout: %d bytes", len(raw))
	}

	r, err := OpenPages(dir, PagesName(1))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Size() != int64(len(want)) {
		t.Fatalf("size %d", r.Size())
	}
	m, err := r.Bytes()
	if err != nil || !bytes.Equal(m, want) {
		t.Fatalf("mmap: %v", err)
	}
	buf := make([]byte, 10)
	if n, err := r.ReadAt(buf, 2*pageSize-5); err != nil || n != 10 || !bytes.Equal(buf, want[2*pageSize-5:][:10]) {
		t.Fatalf("read across pages: %d %v", n, err)
	}
	for _, off := range []int64{r.Size() - 9, r.Size() + 1, -1, 1<<63 - 4} {
		if _, err := r.ReadAt(buf, off); !errors.Is(err, ErrTruncated) {
			t.Errorf("read of 10 at %d: %v", off, err)
		}
	}
}

func TestPagesTruncatedHeader(t *testing.T) {
	noFDLeak(t)
	dir := t.TempDir()
	w, err := CreatePages(dir, PagesName(2))
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	path := filepath.Join(dir, PagesName(2))
	full, _ := os.ReadFile(path)
	for cut := 0; cut < len(full); cut++ {
		os.WriteFile(path, full[:cut], 0o600)
		_, err := OpenPages(dir, PagesName(2))
		if fe := mustFormatErr(t, err, path); !errors.Is(err, ErrTruncated) || fe.Offset != int64(cut) {
			t.Fatalf("cut at %d: %v", cut, err)
		}
	}
	os.WriteFile(path, full, 0o600)
	r, err := OpenPages(dir, PagesName(2))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if m, err := r.Bytes(); r.Size() != 0 || m != nil || err != nil {
		t.Fatalf("empty pages file: size %d, %v %v", r.Size(), m, err)
	}
}

func TestShow(t *testing.T) {
	dir := t.TempDir()
	if err := WriteAll(dir, PstreeName, KindPstree, &pb.PstreeEntry{Pid: 5, Threads: []int32{5, 6}}, &pb.PstreeEntry{Pid: 7}); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := Show(&out, filepath.Join(dir, PstreeName)); err != nil {
		t.Fatal(err)
	}
	want := `{
    "magic": "FERRYIMG",
    "kind": "pstree",
    "version": "2.1",
    "entries": [
        {
            "pid": 5,
            "threads": [
                5,
                6
            ]
        },
        {
            "pid": 7
        }
    ]
}
`
	if out.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", out.String(), want)
	}
}

func TestShowDir(t *testing.T) {
	noFDLeak(t)
	dir := t.TempDir()
	writeSamples(t, dir)
	if err := WriteAll(dir, FdinfoName(9), KindFdinfo); err != nil { // no records
		t.Fatal(err)
	}
	pw, err := CreatePages(dir, PagesName(42))
	if err != nil {
		t.Fatal(err)
	}
	pw.Write(make([]byte, 2*pageSize))
	pw.Close()
	pw, _ = CreatePages(dir, PagesName(43))
	pw.Close()
	os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("not an image"), 0o600)
	os.Mkdir(filepath.Join(dir, "sub.img"), 0o700)

	var out bytes.Buffer
	if err := ShowDir(&out, dir); err != nil {
		t.Fatal(err)
	}
	var got map[string]struct {
		Magic, Kind, Version string
		Entries              []map[string]any
		Size, Pages          *int64
	}
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatalf("%v:\n%s", err, out.String())
	}
	if len(got) != len(sample)+3 {
		t.Errorf("%d files shown, want %d", len(got), len(sample)+3)
	}
	for _, s := range sample {
		f := got[s.name]
		entries := len(s.msgs)
		if s.kind == KindPagemap {
			entries = 3 // the head, and the batch shown as its two entries
		}
		if f.Magic != Magic || f.Kind != s.kind.String() || f.Version != "2.1" || len(f.Entries) != entries || f.Size != nil {
			t.Errorf("%s: %+v", s.name, f)
		}
	}
	if e := got[FdinfoName(9)].Entries; e == nil || len(e) != 0 {
		t.Errorf("a file without records shows entries %v, want []", e)
	}
	if p := got[PagesName(42)]; p.Kind != "pages" || *p.Size != 2*pageSize || *p.Pages != 2 || p.Entries != nil {
		t.Errorf("pages: %+v", p)
	}
	if p := got[PagesName(43)]; p.Size == nil || *p.Size != 0 || *p.Pages != 0 {
		t.Errorf("empty pages: %+v", p)
	}
	for _, want := range []string{`"root_pid": 42`, `"nr_pages": 16`, `"in_parent": true`, `"comm": "worker"`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("show output lacks %s", want)
		}
	}

	// One bad file fails the whole directory, naming the file.
	path := filepath.Join(dir, MmName(42))
	b, _ := os.ReadFile(path)
	os.WriteFile(path, b[:len(b)-1], 0o600)
	out.Reset()
	err = ShowDir(&out, dir)
	if mustFormatErr(t, err, path); !errors.Is(err, ErrTruncated) || out.Len() != 0 {
		t.Fatalf("bad file: %v, output %q", err, out.String())
	}

	if err := ShowDir(io.Discard, t.TempDir()); err == nil {
		t.Fatal("empty directory shown")
	}
}
