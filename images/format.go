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

	"google.golang.org/protobuf/proto"
)

// Format version written by this ferry.
const (
	FormatMajor = 1
	FormatMinor = 0
)

// Magic starts every image file.
const Magic = "FERRYIMG"

const (
	headerSize = 16
	recordHead = 8
	// MaxRecord bounds one record; larger lengths are corruption.
	MaxRecord = 256 << 20
	// PageDataOffset is where page data starts in a pages file.
	PageDataOffset = 4096
)

// Kind tells what an image file holds.
type Kind uint32

// Image kinds. Values are part of the format: append only.
const (
	KindInventory Kind = 1 + iota
	KindPstree
	KindCore
	KindMm
	KindPagemap
	KindPages
	KindFiles
	KindFdinfo
	KindStats
	KindGhost
)

var kindNames = map[Kind]string{
	KindInventory: "inventory", KindPstree: "pstree", KindCore: "core", KindMm: "mm",
	KindPagemap: "pagemap", KindPages: "pages", KindFiles: "files", KindFdinfo: "fdinfo",
	KindStats: "stats", KindGhost: "ghost",
}

func (k Kind) String() string {
	if n, ok := kindNames[k]; ok {
		return n
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

// ParseHeader validates the 16 header bytes of the file at path.
func ParseHeader(path string, b []byte) (Header, error) {
	if len(b) < headerSize {
		return Header{}, formatErr(path, int64(len(b)), ErrTruncated, "header needs %d bytes, file has %d", headerSize, len(b))
	}
	if string(b[:8]) != Magic {
		return Header{}, formatErr(path, 0, ErrBadMagic, "magic %q", b[:8])
	}
	h := Header{
		Kind:  Kind(binary.LittleEndian.Uint32(b[8:])),
		Major: binary.LittleEndian.Uint16(b[12:]),
		Minor: binary.LittleEndian.Uint16(b[14:]),
	}
	if h.Major != FormatMajor {
		return h, formatErr(path, 12, ErrVersion,
			"format version %d.%d; this ferry reads %d.x: use a ferry of the version that wrote it", h.Major, h.Minor, FormatMajor)
	}
	if _, ok := kindNames[h.Kind]; !ok {
		return h, formatErr(path, 8, ErrKind, "unknown kind %d", uint32(h.Kind))
	}
	return h, nil
}

// Writer appends records to an image file.
type Writer struct {
	f   io.WriteCloser
	w   *bufio.Writer
	hdr [recordHead]byte
}

// NewWriter writes an image of kind to wc (e.g. a page server's remote
// file); Close closes wc.
func NewWriter(wc io.WriteCloser, kind Kind) (*Writer, error) {
	w := &Writer{f: wc, w: bufio.NewWriterSize(wc, 64<<10)}
	if _, err := w.w.Write(encodeHeader(kind)); err != nil {
		return nil, err
	}
	return w, nil
}

// Create creates (or truncates) dir/name as an image of kind.
func Create(dir, name string, kind Kind) (*Writer, error) {
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	w := &Writer{f: f, w: bufio.NewWriterSize(f, 64<<10)}
	if _, err := w.w.Write(encodeHeader(kind)); err != nil {
		f.Close()
		return nil, err
	}
	return w, nil
}

// Write appends one record.
func (w *Writer) Write(m proto.Message) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode %T: %w", m, err)
	}
	if len(b) > MaxRecord {
		return fmt.Errorf("record of %d bytes exceeds the %d-byte limit", len(b), MaxRecord)
	}
	binary.LittleEndian.PutUint32(w.hdr[0:], uint32(len(b)))
	binary.LittleEndian.PutUint32(w.hdr[4:], crc32.Checksum(b, crcTable))
	if _, err := w.w.Write(w.hdr[:]); err != nil {
		return err
	}
	_, err = w.w.Write(b)
	return err
}

// Close flushes and closes the file.
func (w *Writer) Close() error {
	err := w.w.Flush()
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// WriteAll writes msgs as the records of a new image file.
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

// Reader reads the records of an image file.
type Reader struct {
	path   string
	c      io.Closer
	r      *bufio.Reader
	off    int64
	Header Header
}

// Open opens dir/name and checks it is an image of kind.
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

// NewReader reads an image from r; path names it in errors. kind 0
// accepts any record kind.
func NewReader(path string, rd io.Reader, kind Kind) (*Reader, error) {
	r := &Reader{path: path, r: bufio.NewReaderSize(rd, 64<<10)}
	hb := make([]byte, headerSize)
	n, err := io.ReadFull(r.r, hb)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, err
	}
	h, err := ParseHeader(path, hb[:n])
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

// Next decodes the next record into m; io.EOF at a clean end.
func (r *Reader) Next(m proto.Message) error {
	var hdr [recordHead]byte
	n, err := io.ReadFull(r.r, hdr[:])
	if errors.Is(err, io.EOF) {
		return io.EOF
	}
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return formatErr(r.path, r.off+int64(n), ErrTruncated, "record header cut short")
		}
		return err
	}
	size := binary.LittleEndian.Uint32(hdr[0:])
	sum := binary.LittleEndian.Uint32(hdr[4:])
	if size > MaxRecord {
		return formatErr(r.path, r.off, ErrCorrupt, "record length %d exceeds %d", size, MaxRecord)
	}
	// Read in bounded steps so a corrupt length cannot make us allocate
	// far more than the file holds.
	payload := make([]byte, 0, min(int(size), 1<<20))
	for len(payload) < int(size) {
		chunk := min(int(size)-len(payload), 1<<20)
		start := len(payload)
		payload = append(payload, make([]byte, chunk)...)
		got, err := io.ReadFull(r.r, payload[start:])
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return formatErr(r.path, r.off+recordHead+int64(start+got), ErrTruncated,
					"record of %d bytes at offset %d cut short", size, r.off)
			}
			return err
		}
	}
	if crc32.Checksum(payload, crcTable) != sum {
		return formatErr(r.path, r.off, ErrCorrupt, "record checksum mismatch")
	}
	if err := proto.Unmarshal(payload, m); err != nil {
		return formatErr(r.path, r.off, ErrCorrupt, "undecodable %T record: %v", m, err)
	}
	r.off += recordHead + int64(size)
	return nil
}

// Offset is the byte offset of the next record.
func (r *Reader) Offset() int64 { return r.off }

// Close closes the file.
func (r *Reader) Close() error {
	if r.c != nil {
		return r.c.Close()
	}
	return nil
}

// ReadOne reads a file that must hold exactly one record.
func ReadOne(dir, name string, kind Kind, m proto.Message) error {
	r, err := Open(dir, name, kind)
	if err != nil {
		return err
	}
	defer r.Close()
	if err := r.Next(m); err != nil {
		if errors.Is(err, io.EOF) {
			return formatErr(r.path, r.off, ErrTruncated, "no record")
		}
		return err
	}
	var extra emptyMsg
	if err := r.Next(&extra); !errors.Is(err, io.EOF) {
		return formatErr(r.path, r.off, ErrCorrupt, "more than one record")
	}
	return nil
}
