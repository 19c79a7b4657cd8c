package images

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"testing"

	"google.golang.org/protobuf/proto"
)

// encode returns the bytes of a record image of kind holding msgs.
func encode(tb testing.TB, kind Kind, msgs ...proto.Message) []byte {
	var buf closeBuffer
	w, err := NewWriter(&buf, kind)
	if err != nil {
		tb.Fatal(err)
	}
	for _, m := range msgs {
		if err := w.Write(m); err != nil {
			tb.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

func crc32c(b []byte) uint32 { return crc32.Checksum(b, crcTable) }

// checkReadErr fails t unless err is a *FormatError for a bad image (or
// io.EOF) with an offset inside the data.
func checkReadErr(t *testing.T, err error, size int) {
	t.Helper()
	if errors.Is(err, io.EOF) {
		return
	}
	var fe *FormatError
	if !errors.As(err, &fe) {
		t.Fatalf("%v (%T) is not a *FormatError", err, err)
	}
	if fe.Path != "fuzz" || fe.Offset < 0 || fe.Offset > int64(size) {
		t.Fatalf("bad path or offset (data of %d bytes): %v", size, err)
	}
	n := 0
	for _, s := range []error{ErrBadMagic, ErrKind, ErrVersion, ErrTruncated, ErrCorrupt} {
		if errors.Is(err, s) {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("error matches %d sentinels: %v", n, err)
	}
}

func FuzzReader(f *testing.F) {
	for _, s := range sample {
		b := encode(f, s.kind, s.msgs...)
		f.Add(b)
		f.Add(b[:len(b)-1])
	}
	f.Add(encode(f, KindPagemap))
	f.Add(encodeHeader(KindPages))
	// A record whose checksum is right and whose payload is not protobuf.
	bad := binary.LittleEndian.AppendUint32(encodeHeader(KindCore), 2)
	bad = binary.LittleEndian.AppendUint32(bad, crc32c([]byte{0x0a, 0xff}))
	f.Add(append(bad, 0x0a, 0xff))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := NewReader("fuzz", bytes.NewReader(data), 0)
		if err != nil {
			checkReadErr(t, err, len(data))
			return
		}
		for i := 0; ; i++ {
			if err := r.Next(newRecord(r.Header.Kind, i)); err != nil {
				checkReadErr(t, err, len(data))
				if !errors.Is(err, io.EOF) && r.Next(newRecord(r.Header.Kind, i)) != err {
					t.Fatal("error not sticky")
				}
				break
			}
			if r.Offset() > int64(len(data)) {
				t.Fatalf("offset %d past the end of %d bytes", r.Offset(), len(data))
			}
		}
		if r.Header.Kind == KindPagemap {
			pr, err := NewReader("fuzz", bytes.NewReader(data), 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, _, err := readPagemap(pr, 0); err != nil {
				checkReadErr(t, err, len(data))
			}
		}
		// Show decodes the same way, and what it decodes prints.
		d, err := decodeRecords("fuzz", bytes.NewReader(data))
		if err != nil {
			checkReadErr(t, err, len(data))
			return
		}
		if err := writeJSON(io.Discard, d); err != nil {
			t.Fatalf("decoded image does not print: %v", err)
		}
	})
}

func FuzzHeader(f *testing.F) {
	for k := KindInventory; k <= KindGhost; k++ {
		f.Add(encodeHeader(k))
	}
	f.Add([]byte("FERRYIMG"))
	f.Add(append([]byte("FERRYIMG"), 3, 0, 0, 0, 2, 0, 0, 0))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader("fuzz", b)
		if err != nil {
			checkReadErr(t, err, len(b))
			return
		}
		if len(b) < headerSize || string(b[:8]) != Magic || h.Major != FormatMajor || !h.Kind.valid() {
			t.Fatalf("accepted %x as %+v", b, h)
		}
	})
}
