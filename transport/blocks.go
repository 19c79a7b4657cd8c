package transport

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"

	"github.com/klauspost/compress/zstd"
)

// Block compression (FlagZstdFrames). The frames of a stream go in blocks,
// each compressed or not on its own: a block that does not compress is
// sent as it is and costs no more CPU than an uncompressed stream. Random
// or encrypted pages are common; a zstd stream around everything spent more
// CPU on them than TLS did and saved nothing.
//
// A block is a kind byte, the length of what follows, and for a zstd
// block the length it decodes to:
//
//	blockRaw  u32 n, n bytes
//	blockZstd u32 n, u32 decoded length, n bytes of one zstd frame
//
// Small frames gather in a block of up to blockSize bytes, sent when full
// or flushed; a payload of directWrite bytes or more is a block of its own
// (on plain TCP, written from the caller's buffer when it goes raw).
const (
	blockRaw  = 0
	blockZstd = 1

	blockSize = 512 << 10
	// minSqueeze: smaller blocks (requests, acknowledgements) go raw.
	minSqueeze = 2 << 10
	// A block of sampleFrom bytes or more is compressed only if samples
	// pieces spread over it compress to at most 3/4 (the samples of a
	// 512 KiB block cost 1.6% of compressing all of it); a compressed
	// block is sent only if it saves an eighth.
	sampleFrom = 16 << 10
	samples    = 8
)

// blockWriter writes blocks to bw (and large raw ones straight to conn
// when it is plain TCP).
type blockWriter struct {
	bw   *bufio.Writer
	conn net.Conn
	z    *zstd.Encoder
	buf  []byte // the block being gathered
	zbuf []byte // compressed output
	samp []byte
}

func newBlockWriter(bw *bufio.Writer, conn net.Conn) (*blockWriter, error) {
	z, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, err
	}
	return &blockWriter{bw: bw, conn: conn, z: z, buf: make([]byte, 0, blockSize)}, nil
}

// writeFrame writes a frame's header and payload.
func (w *blockWriter) writeFrame(head, payload []byte) error {
	if len(payload) >= directWrite {
		w.buf = append(w.buf, head...)
		if err := w.emit(); err != nil {
			return err
		}
		return w.block(payload, true)
	}
	if len(w.buf)+len(head)+len(payload) > blockSize {
		if err := w.emit(); err != nil {
			return err
		}
	}
	w.buf = append(append(w.buf, head...), payload...)
	return nil
}

// flush sends the block gathered so far and what bw holds.
func (w *blockWriter) flush() error {
	if err := w.emit(); err != nil {
		return err
	}
	return w.bw.Flush()
}

func (w *blockWriter) emit() error {
	if len(w.buf) == 0 {
		return nil
	}
	err := w.block(w.buf, false)
	w.buf = w.buf[:0]
	return err
}

// block sends p as one block, compressed if that pays; a raw block of a
// caller's payload (direct) goes from p to a TCP socket without a copy.
func (w *blockWriter) block(p []byte, direct bool) error {
	var h [9]byte
	if z := w.squeeze(p); z != nil {
		h[0] = blockZstd
		binary.LittleEndian.PutUint32(h[1:], uint32(len(z)))
		binary.LittleEndian.PutUint32(h[5:], uint32(len(p)))
		return writeOut(w.bw, w.bw, w.conn, h[:], z, false)
	}
	h[0] = blockRaw
	binary.LittleEndian.PutUint32(h[1:], uint32(len(p)))
	return writeOut(w.bw, w.bw, w.conn, h[:5], p, direct)
}

// squeeze returns p compressed (in w.zbuf), or nil when p is to go raw.
func (w *blockWriter) squeeze(p []byte) []byte {
	n := len(p)
	if n < minSqueeze {
		return nil
	}
	if n >= sampleFrom {
		piece := min(1<<10, n/(4*samples))
		w.samp = w.samp[:0]
		for i := range samples {
			off := n / samples * i
			w.samp = append(w.samp, p[off:off+piece]...)
		}
		w.zbuf = w.z.EncodeAll(w.samp, w.zbuf[:0])
		if len(w.zbuf) > len(w.samp)*3/4 {
			return nil
		}
	}
	w.zbuf = w.z.EncodeAll(p, w.zbuf[:0])
	if len(w.zbuf) > n-n/8 {
		return nil
	}
	return w.zbuf
}

// blockReader reads the bytes of the blocks from r: raw ones straight into
// the caller's buffer, zstd ones decoded first.
type blockReader struct {
	r     io.Reader
	d     *zstd.Decoder
	left  int    // bytes of the current raw block not yet read
	plain []byte // the current zstd block decoded
	rest  []byte // what of plain is not yet read
	zbuf  []byte
}

func newBlockReader(r io.Reader) (*blockReader, error) {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(MaxFrame))
	if err != nil {
		return nil, err
	}
	return &blockReader{r: r, d: d}, nil
}

func (b *blockReader) Read(p []byte) (int, error) {
	for b.left == 0 && len(b.rest) == 0 {
		if err := b.next(); err != nil {
			return 0, err
		}
	}
	if len(b.rest) > 0 {
		n := copy(p, b.rest)
		b.rest = b.rest[n:]
		return n, nil
	}
	n, err := b.r.Read(p[:min(len(p), b.left)])
	b.left -= n
	if err == io.EOF && b.left > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// next reads the next block's header, and a zstd block whole.
func (b *blockReader) next() error {
	var h [9]byte
	if _, err := io.ReadFull(b.r, h[:5]); err != nil {
		return err // io.EOF between blocks: the stream ended cleanly
	}
	n := binary.LittleEndian.Uint32(h[1:])
	if n > MaxFrame {
		return fmt.Errorf("block of %d bytes exceeds %d (corrupt stream)", n, MaxFrame)
	}
	switch h[0] {
	case blockRaw:
		b.left = int(n)
		return nil
	case blockZstd:
	default:
		return fmt.Errorf("unknown block kind %d (corrupt stream)", h[0])
	}
	if _, err := io.ReadFull(b.r, h[5:]); err != nil {
		return unexpected(err)
	}
	raw := binary.LittleEndian.Uint32(h[5:])
	if raw > MaxFrame {
		return fmt.Errorf("compressed block of %d bytes exceeds %d (corrupt stream)", raw, MaxFrame)
	}
	if cap(b.zbuf) < int(n) {
		b.zbuf = make([]byte, n)
	}
	b.zbuf = b.zbuf[:n]
	if _, err := io.ReadFull(b.r, b.zbuf); err != nil {
		return unexpected(err)
	}
	var err error
	if b.plain, err = b.d.DecodeAll(b.zbuf, b.plain[:0]); err != nil {
		return fmt.Errorf("compressed block: %w (corrupt stream)", err)
	}
	if len(b.plain) != int(raw) {
		return fmt.Errorf("compressed block decodes to %d bytes, not the %d its header says (corrupt stream)", len(b.plain), raw)
	}
	b.rest = b.plain
	return nil
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
