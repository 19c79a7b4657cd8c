package dumpcore

import (
	"errors"
	"log/slog"
	"os"
	"slices"
	"testing"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/testutil"
)

// TestServeLazyChecksEarlyFlags: dump --lazy-pages takes VMA flags from
// smaps read before the freeze; no page is served unless smaps of the
// frozen tree agrees.
func TestServeLazyChecksEarlyFlags(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root")
	}
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "4")
	buf := bufferVMA(t, w.Pid)
	for _, tc := range []struct {
		name  string
		alter bool
		want  error
	}{{"same flags", false, nil}, {"flags changed", true, errFlagsMoved}} {
		vmas, err := proc.ReadSmaps(w.Pid)
		if err != nil {
			t.Fatal(err)
		}
		var served int
		tr := newTree(Options{Pid: w.Pid, Logger: slog.New(slog.DiscardHandler), LazyServe: func(read func(int, uint64, []byte) error, _ func(int) ([][2]uint64, error)) error {
			page := make([]byte, pageSize)
			if err := read(w.Pid, buf.Start, page); err != nil {
				return err
			}
			served++
			return nil
		}})
		d := tr.procs[0]
		d.early = map[vmaKey][]string{}
		for i := range vmas {
			k := keyOf(&vmas[i])
			d.early[k] = vmas[i].VmFlags
			if tc.alter && vmas[i].Start == buf.Start {
				d.early[k] = append(slices.Clone(vmas[i].VmFlags), "lo")
			}
			d.usedEarly = append(d.usedEarly, k)
		}
		err = tr.serveLazy([]*imageSet{{mm: &pb.MmCore{}}})
		if !errors.Is(err, tc.want) || (tc.want == nil) != (served == 1) {
			t.Fatalf("%s: %v, %d pages served", tc.name, err, served)
		}
	}
}
