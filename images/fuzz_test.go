package images

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/ferrycr/ferry/images/pb"
)

func FuzzReader(f *testing.F) {
	var buf bytes.Buffer
	dir := f.TempDir()
	WriteAll(dir, "c.img", KindCore, &pb.TaskCore{Pid: 1, Comm: "x", Threads: []*pb.ThreadCore{{Tid: 1}}})
	b, _ := readFile(dir + "/c.img")
	f.Add(b)
	buf.Write(encodeHeader(KindPagemap))
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := NewReader("fuzz", bytes.NewReader(data), 0)
		if err != nil {
			return
		}
		for i := 0; i < 1000; i++ {
			m := newRecord(r.Header.Kind, i)
			if m == nil {
				return
			}
			if err := r.Next(m); err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrTruncated) {
					t.Fatalf("unexpected error class: %v", err)
				}
				return
			}
		}
	})
}

func FuzzHeader(f *testing.F) {
	f.Add(encodeHeader(KindCore))
	f.Fuzz(func(t *testing.T, b []byte) { ParseHeader("fuzz", b) })
}
