package images

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// PageWriter writes a pages file: header, padding, raw page data. It does
// not buffer: each Write goes straight to the file, so callers hand it
// large runs of pages.
type PageWriter struct {
	f   *os.File       // local file (writev), or nil
	w   io.WriteCloser // any sink otherwise
	off int64
	// z compresses the page data into f (CreatePagesZstd); off counts
	// the data before compression.
	z *zstd.Encoder
}

// Zstd is the PagemapHead.Compression of a pages file whose data is one
// zstd stream.
const Zstd = "zstd"

// CreatePagesZstd creates dir/name as a pages file whose data is
// compressed with zstd (the pagemap must say Compression: Zstd).
func CreatePagesZstd(dir, name string) (*PageWriter, error) {
	w, err := CreatePages(dir, name)
	if err != nil {
		return nil, err
	}
	// The fastest level: memory dumps are large, and what compresses at
	// all (zeroed or repetitive memory) compresses well at any level.
	w.z, err = zstd.NewWriter(w.f, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(2))
	if err != nil {
		w.f.Close()
		return nil, err
	}
	return w, nil
}

// NewPageStream writes a pages file to wc (e.g. a page server's remote
// file); Close closes wc.
func NewPageStream(wc io.WriteCloser) (*PageWriter, error) {
	if _, err := wc.Write(pagesHeader()); err != nil {
		return nil, err
	}
	return &PageWriter{w: wc}, nil
}

// pagesHeader is everything before the page data: the header and its
// zero padding.
func pagesHeader() []byte {
	b := make([]byte, PageDataOffset)
	copy(b, encodeHeader(KindPages))
	return b
}

// CreatePages creates dir/name, truncating it if it exists, as a pages
// file.
func CreatePages(dir, name string) (*PageWriter, error) {
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	if _, err := f.Write(pagesHeader()); err != nil {
		f.Close()
		return nil, err
	}
	return &PageWriter{f: f}, nil
}

// Write appends page data (unbuffered: callers write large runs).
func (w *PageWriter) Write(p []byte) (int, error) {
	var n int
	var err error
	if w.z != nil {
		n, err = w.z.Write(p)
	} else if w.f != nil {
		n, err = w.f.Write(p)
	} else {
		n, err = w.w.Write(p)
	}
	w.off += int64(n)
	return n, err
}

// WriteVec appends the buffers in order with as few writev(2) calls as
// the kernel's iovec limit allows.
func (w *PageWriter) WriteVec(bufs [][]byte) (int64, error) {
	var total int64
	if w.f == nil || w.z != nil {
		for _, b := range bufs {
			n, err := w.Write(b)
			total += int64(n)
			if err != nil {
				return total, err
			}
		}
		return total, nil
	}
	for len(bufs) > 0 {
		n := min(len(bufs), 1024)
		want := 0
		for _, b := range bufs[:n] {
			want += len(b)
		}
		got, err := writev(int(w.f.Fd()), bufs[:n])
		total += int64(got)
		w.off += int64(got)
		if err != nil {
			return total, fmt.Errorf("write %s: %w", w.f.Name(), err)
		}
		if got != want {
			// Short write: finish the rest plainly.
			rest := make([]byte, 0, want-got)
			skip := got
			for _, b := range bufs[:n] {
				if skip >= len(b) {
					skip -= len(b)
					continue
				}
				rest = append(rest, b[skip:]...)
				skip = 0
			}
			m, err := w.Write(rest)
			total += int64(m)
			if err != nil {
				return total, err
			}
		}
		bufs = bufs[n:]
	}
	return total, nil
}

func writev(fd int, bufs [][]byte) (int, error) {
	for {
		n, err := unix.Writev(fd, bufs)
		if err != unix.EINTR {
			return n, err
		}
	}
}

// Offset is the number of data bytes written so far: the data offset
// the next Write lands at.
func (w *PageWriter) Offset() int64 { return w.off }

// Close ends the compressed stream, if any, and closes the file.
func (w *PageWriter) Close() error {
	if w.z != nil {
		if err := w.z.Close(); err != nil {
			w.f.Close()
			return fmt.Errorf("write %s: %w", w.f.Name(), err)
		}
	}
	if w.f != nil {
		return w.f.Close()
	}
	return w.w.Close()
}

// PageReader reads a pages file.
type PageReader struct {
	path string
	f    *os.File
	size int64
	m    []byte // the mapped file (Bytes), or decompressed data (anon)
	anon bool
}

// OpenPages opens dir/name and checks that it is a pages file of a
// format version this ferry reads.
func OpenPages(dir, name string) (*PageReader, error) {
	path := filepath.Join(dir, name)
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	r, err := newPageReader(path, f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return r, nil
}

// newPageReader checks the pages file f, wherever its file offset is.
func newPageReader(path string, f *os.File) (*PageReader, error) {
	h, err := readHeader(path, io.NewSectionReader(f, 0, headerSize))
	if err != nil {
		return nil, err
	}
	if h.Kind != KindPages {
		return nil, formatErr(path, 8, ErrKind, "holds %s, want pages", h.Kind)
	}
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() < PageDataOffset {
		return nil, formatErr(path, st.Size(), ErrTruncated, "pages header needs %d bytes, file has %d", PageDataOffset, st.Size())
	}
	return &PageReader{path: path, f: f, size: st.Size() - PageDataOffset}, nil
}

// Size is the number of data bytes.
func (r *PageReader) Size() int64 { return r.size }

// ReadAt reads len(p) data bytes at off, counted from the start of the
// page data. A read that does not fit in the page data fails whole with
// ErrTruncated.
func (r *PageReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off > r.size || int64(len(p)) > r.size-off {
		return 0, formatErr(r.path, PageDataOffset+r.size, ErrTruncated,
			"read of %d bytes at data offset %d past the end of page data (%d bytes)", len(p), off, r.size)
	}
	n, err := r.f.ReadAt(p, PageDataOffset+off)
	if err != nil {
		// The file shrank under us, or the disk failed.
		return n, readErr(r.path, PageDataOffset+off+int64(n), err)
	}
	return n, nil
}

// Bytes maps the page data read-only and shared, so that page data need
// not be copied through a buffer. The slice is valid until Close, and nil
// for a file without data. Callers must not write to it (it faults).
func (r *PageReader) Bytes() ([]byte, error) {
	if r.size == 0 {
		return nil, nil
	}
	if r.anon {
		return nil, fmt.Errorf("images: %s: compressed pages have no raw bytes", r.path)
	}
	if r.m == nil {
		m, err := unix.Mmap(int(r.f.Fd()), 0, int(r.size+PageDataOffset), unix.PROT_READ, unix.MAP_SHARED)
		if err != nil {
			return nil, fmt.Errorf("images: %s: %w", r.path, os.NewSyscallError("mmap", err))
		}
		r.m = m
	}
	return r.m[PageDataOffset:], nil
}

// Decompressed decodes the zstd stream of a compressed pages file into
// memory, which must come to exactly size bytes (what the pagemap
// accounts for). The slice is valid until Close.
func (r *PageReader) Decompressed(size int64) ([]byte, error) {
	if r.m != nil {
		return nil, fmt.Errorf("images: %s: decompressed twice", r.path)
	}
	if size == 0 {
		return nil, nil
	}
	m, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("images: %s: %d bytes to decompress into: %w", r.path, size, os.NewSyscallError("mmap", err))
	}
	r.m, r.anon = m, true
	d, err := zstd.NewReader(io.NewSectionReader(r.f, PageDataOffset, r.size), zstd.WithDecoderConcurrency(2))
	if err != nil {
		return nil, err
	}
	defer d.Close()
	n, err := io.ReadFull(d, m)
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return nil, formatErr(r.path, PageDataOffset, ErrTruncated, "compressed pages hold %d bytes, the pagemap accounts for %d", n, size)
	case err != nil:
		return nil, formatErr(r.path, PageDataOffset, ErrCorrupt, "compressed pages: %v", err)
	}
	// Reading on to the end also checks the stream's checksum.
	var extra [1]byte
	switch k, err := d.Read(extra[:]); {
	case k > 0:
		return nil, formatErr(r.path, PageDataOffset, ErrCorrupt, "compressed pages hold more than the %d bytes the pagemap accounts for", size)
	case err != nil && !errors.Is(err, io.EOF):
		return nil, formatErr(r.path, PageDataOffset, ErrCorrupt, "compressed pages: %v", err)
	}
	return m, nil
}

// Path is the file's path.
func (r *PageReader) Path() string { return r.path }

// Close unmaps and closes.
func (r *PageReader) Close() error {
	if r.m != nil {
		unix.Munmap(r.m)
		r.m, r.anon = nil, false
	}
	return r.f.Close()
}
