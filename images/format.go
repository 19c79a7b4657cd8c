package images

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"

	"google.golang.org/protobuf/proto"
)

// Format version written by this ferry. A reader accepts every minor
// version of its major version: minor versions only append fields and
// flags (a reader refuses flags it does not know).
const (
	FormatMajor = 2 // 2: pagemap entries in PagemapBatch records
	FormatMinor = 1 // 1: parent runs with holes (PageEntry.Holes)
)

// Magic starts every image file.
const Magic = "FERRYIMG"

const (
	headerSize = 16 // magic, kind, major, minor
	recordHead = 8  // length, crc32c
	// MaxRecord bounds the payload of one record; a larger length is
	// corruption, refused before anything is allocated.
	MaxRecord = 256 << 20
	// PageDataOffset is where page data starts in a pages file.
	PageDataOffset = 4096
	// pageSize is the unit the pages file counts in.
	pageSize = 4096
	// bufSize is the buffer of record readers and writers.
	bufSize = 64 << 10
	// readChunk bounds each allocation step while reading a payload, so a
	// length that lies about a short file costs at most this much.
	readChunk = 1 << 20
)

// Kind tells what an image file holds.
type Kind uint32

// Image kinds. The values are part of the format: append only.
const (
	KindInventory Kind = 1 + iota // inventory.img: Inventory
	KindPstree                    // pstree.img: PstreeEntry per process
	KindCore                      // core-PID.img: TaskCore
	KindMm                        // mm-PID.img: MmCore
	KindPagemap                   // pagemap-PID.img: PagemapHead, then PagemapBatch records
	KindPages                     // pages-ID.img: raw page data, no records
	KindFiles                     // files.img: FileEntry per open file
	KindFdinfo                    // fdinfo-PID.img: FdTable
	KindStats                     // stats-dump, stats-restore: Stats
	KindGhost                     // ghost-ID.img: GhostFile
	KindIpc                       // ipc.img: IpcObject per SysV object of the tree's IPC namespace
)

var kindNames = [...]string{
	KindInventory: "inventory", KindPstree: "pstree", KindCore: "core", KindMm: "mm",
	KindPagemap: "pagemap", KindPages: "pages", KindFiles: "files", KindFdinfo: "fdinfo",
	KindStats: "stats", KindGhost: "ghost", KindIpc: "ipc",
}

func (k Kind) valid() bool { return k > 0 && int64(k) < int64(len(kindNames)) }

func (k Kind) String() string {
	if k.valid() {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", uint32(k))
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// Header is the parsed start of an image file.
type Header struct {
	Kind         Kind
	Major, Minor uint16
}

func encodeHeader(k Kind) []byte {
	b := make([]byte, headerSize)
	copy(b, Magic)
	binary.LittleEndian.PutUint32(b[8:], uint32(k))
	binary.LittleEndian.PutUint16(b[12:], FormatMajor)
	binary.LittleEndian.PutUint16(b[14:], FormatMinor)
	return b
}

// ParseHeader validates the header bytes b of the file at path (which
// only names it in errors): the magic, a major version this ferry reads
// and a known kind. b may be shorter than a header, as a short file is.
func ParseHeader(path string, b []byte) (Header, error) {
	if len(b) < headerSize {
		return Header{}, formatErr(path, int64(len(b)), ErrTruncated,
			"header needs %d bytes, file has %d", headerSize, len(b))
	}
	if string(b[:8]) != Magic {
		return Header{}, formatErr(path, 0, ErrBadMagic, "magic %q, want %q", b[:8], Magic)
	}
	h := Header{
		Kind:  Kind(binary.LittleEndian.Uint32(b[8:])),
		Major: binary.LittleEndian.Uint16(b[12:]),
		Minor: binary.LittleEndian.Uint16(b[14:]),
	}
	// The version comes before the kind: a newer ferry may have kinds
	// this one has never heard of.
	switch {
	case h.Major > FormatMajor:
		return h, formatErr(path, 12, ErrVersion,
			"format version %d.%d is newer than this ferry supports (%d.x); upgrade ferry", h.Major, h.Minor, FormatMajor)
	case h.Major < FormatMajor:
		return h, formatErr(path, 12, ErrVersion,
			"format version %d.%d is older than this ferry supports (%d.x)", h.Major, h.Minor, FormatMajor)
	}
	if !h.Kind.valid() {
		return h, formatErr(path, 8, ErrKind, "unknown kind %d", uint32(h.Kind))
	}
	return h, nil
}

// readHeader reads and parses the header at the start of r.
func readHeader(path string, r io.Reader) (Header, error) {
	var b [headerSize]byte
	n, err := io.ReadFull(r, b[:])
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		return Header{}, readErr(path, int64(n), err)
	}
	return ParseHeader(path, b[:n])
}

// Writer appends records to an image file. It buffers; Close flushes.
type Writer struct {
	path string
	wc   io.WriteCloser
	w    *bufio.Writer
	hdr  [recordHead]byte
}

// NewWriter writes an image of kind to wc (e.g. a page server's remote
// file); Close closes wc.
func NewWriter(wc io.WriteCloser, kind Kind) (*Writer, error) {
	return newWriter("", wc, kind)
}

func newWriter(path string, wc io.WriteCloser, kind Kind) (*Writer, error) {
	w := &Writer{path: path, wc: wc, w: bufio.NewWriterSize(wc, bufSize)}
	if _, err := w.w.Write(encodeHeader(kind)); err != nil {
		return nil, err
	}
	return w, nil
}

// Create creates dir/name, truncating it if it exists, as an image of kind.
func Create(dir, name string, kind Kind) (*Writer, error) {
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	w, err := newWriter(path, f, kind)
	if err != nil {
		f.Close()
		return nil, err
	}
	return w, nil
}

// Write appends m as one record.
func (w *Writer) Write(m proto.Message) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return fmt.Errorf("images: %s: encode %T: %w", w.path, m, err)
	}
	if len(b) > MaxRecord {
		return fmt.Errorf("images: %s: %T record of %d bytes exceeds the %d-byte limit", w.path, m, len(b), MaxRecord)
	}
	binary.LittleEndian.PutUint32(w.hdr[0:], uint32(len(b)))
	binary.LittleEndian.PutUint32(w.hdr[4:], crc32.Checksum(b, crcTable))
	if _, err := w.w.Write(w.hdr[:]); err != nil {
		return err
	}
	_, err = w.w.Write(b)
	return err
}

// Close flushes the buffered records and closes the file.
func (w *Writer) Close() error {
	err := w.w.Flush()
	if cerr := w.wc.Close(); err == nil {
		err = cerr
	}
	return err
}

// WriteAll writes msgs as the records of a new image file dir/name.
func WriteAll(dir, name string, kind Kind, msgs ...proto.Message) error {
	w, err := Create(dir, name, kind)
	if err != nil {
		return err
	}
	for _, m := range msgs {
		if err := w.Write(m); err != nil {
			w.Close()
			return err
		}
	}
	return w.Close()
}

// Reader reads the records of an image file. After the first error other
// than io.EOF, every Next returns that error again.
type Reader struct {
	Header Header

	path string
	c    io.Closer // the file Open opened, or nil
	r    *bufio.Reader
	buf  []byte // the last record's payload
	off  int64  // of the next record
	err  error  // sticky
}

// Open opens dir/name and checks that it is an image of kind, of a
// format version this ferry reads.
func Open(dir, name string, kind Kind) (*Reader, error) {
	path := filepath.Join(dir, name)
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	r, err := NewReader(path, f, kind)
	if err != nil {
		f.Close()
		return nil, err
	}
	r.c = f
	return r, nil
}

// NewReader reads a record image from rd; path names it in errors. A kind
// of 0 accepts any kind that has records.
func NewReader(path string, rd io.Reader, kind Kind) (*Reader, error) {
	r := &Reader{path: path, r: bufio.NewReaderSize(rd, bufSize)}
	h, err := readHeader(path, r.r)
	if err != nil {
		return nil, err
	}
	if kind != 0 && h.Kind != kind {
		return nil, formatErr(path, 8, ErrKind, "holds %s, want %s", h.Kind, kind)
	}
	if h.Kind == KindPages {
		return nil, formatErr(path, 8, ErrKind, "a pages file has no records")
	}
	r.Header = h
	r.off = headerSize
	return r, nil
}

// Next decodes the next record into m. It returns io.EOF at a clean end
// of the file, and a *FormatError for a record cut short, one whose
// checksum or length is wrong, or one that does not decode as m.
func (r *Reader) Next(m proto.Message) error {
	return r.nextWith(func(b []byte) error { return proto.Unmarshal(b, m) }, string(m.ProtoReflect().Descriptor().Name()))
}

// nextWith reads the next record and decodes it with decode (what names
// the record's type in errors).
func (r *Reader) nextWith(decode func([]byte) error, what string) error {
	if r.err != nil {
		return r.err
	}
	payload, err := r.record()
	if err != nil {
		if !errors.Is(err, io.EOF) {
			r.err = err
		}
		return err
	}
	if err := decode(payload); err != nil {
		r.err = formatErr(r.path, r.off, ErrCorrupt, "undecodable %s record: %v", what, err)
		return r.err
	}
	r.off += recordHead + int64(len(payload))
	return nil
}

// record reads and checks the next record's payload; r.off stays at its
// start.
func (r *Reader) record() ([]byte, error) {
	var hdr [recordHead]byte
	n, err := io.ReadFull(r.r, hdr[:])
	switch {
	case errors.Is(err, io.EOF):
		return nil, io.EOF
	case errors.Is(err, io.ErrUnexpectedEOF):
		return nil, formatErr(r.path, r.off+int64(n), ErrTruncated, "record header cut short")
	case err != nil:
		return nil, readErr(r.path, r.off+int64(n), err)
	}
	size := binary.LittleEndian.Uint32(hdr[0:])
	sum := binary.LittleEndian.Uint32(hdr[4:])
	if size > MaxRecord {
		return nil, formatErr(r.path, r.off, ErrCorrupt, "record length %d exceeds the %d-byte limit", size, MaxRecord)
	}
	// Grow in bounded steps: a length that lies about a short file costs
	// at most one readChunk more than the file holds.
	// The buffer is reused from record to record: decoders copy what
	// they keep.
	payload := r.buf[:0]
	for len(payload) < int(size) {
		start := len(payload)
		n := min(int(size)-start, readChunk)
		payload = slices.Grow(payload, n)[:start+n]
		got, err := io.ReadFull(r.r, payload[start:])
		at := r.off + recordHead + int64(start+got)
		switch {
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
			return nil, formatErr(r.path, at, ErrTruncated, "record of %d bytes at offset %d cut short", size, r.off)
		case err != nil:
			return nil, readErr(r.path, at, err)
		}
	}
	r.buf = payload
	if crc32.Checksum(payload, crcTable) != sum {
		return nil, formatErr(r.path, r.off, ErrCorrupt, "record checksum mismatch")
	}
	return payload, nil
}

// Offset is the byte offset of the next record.
func (r *Reader) Offset() int64 { return r.off }

// Path is the file's path, as errors name it.
func (r *Reader) Path() string { return r.path }

// Close closes the file Open opened; for a NewReader it does nothing.
func (r *Reader) Close() error {
	if r.c != nil {
		return r.c.Close()
	}
	return nil
}

// ReadOne reads dir/name, an image of kind that must hold exactly one
// record, into m.
func ReadOne(dir, name string, kind Kind, m proto.Message) error {
	r, err := Open(dir, name, kind)
	if err != nil {
		return err
	}
	defer r.Close()
	if err := r.Next(m); err != nil {
		if errors.Is(err, io.EOF) {
			return formatErr(r.path, r.off, ErrTruncated, "no record, want one")
		}
		return err
	}
	switch _, err := r.record(); {
	case errors.Is(err, io.EOF):
		return nil
	case err != nil:
		return err
	}
	return formatErr(r.path, r.off, ErrCorrupt, "more than one record, want one")
}
