package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/testutil"
)

// BenchmarkDumpRestore dumps and restores the memcheck workload; run with
// go test -run '^$' -bench DumpRestore ./cmd/ferry (root). Images go to
// /dev/shm. Reports frozen time and restore time per operation; bytes/s is
// image bytes. `make bench` compares against the write-loop limit.
func BenchmarkDumpRestore(b *testing.B) {
	if os.Getuid() != 0 {
		b.Skip("needs root")
	}
	for _, mib := range []int{64, 256} {
		b.Run(fmt.Sprintf("%dMiB", mib), func(b *testing.B) {
			bin := testutil.BuildC(b, "memcheck")
			var frozen, restore time.Duration
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				w := testutil.Start(b, "-r", bin, "-m", strconv.Itoa(mib))
				img, err := os.MkdirTemp("/dev/shm", "ferry-bench-")
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if code := runIO([]string{"dump", "-t", strconv.Itoa(w.Pid), "-D", img}, io.Discard, io.Discard); code != 0 {
					b.Fatalf("dump exit %d", code)
				}
				b.StopTimer()
				w.Reap(b)
				var st pb.Stats
				if err := images.ReadOne(img, "stats-dump", images.KindStats, &st); err != nil {
					b.Fatal(err)
				}
				frozen += time.Duration(st.Dump.FrozenTimeUs) * time.Microsecond
				b.SetBytes(int64(st.Dump.BytesWritten))
				t0 := time.Now()
				b.StartTimer()
				if code := runIO([]string{"restore", "-D", img, "-d"}, io.Discard, io.Discard); code != 0 {
					b.Fatalf("restore exit %d", code)
				}
				b.StopTimer()
				restore += time.Since(t0)
				r := testutil.Attach(b, w.Pid, w.ReportPath)
				if rep, err := r.TryReport(30 * time.Second); err != nil || rep.Status != "ok" {
					b.Fatalf("restored workload: %v %v", rep, err)
				}
				r.Kill()
				os.RemoveAll(filepath.Clean(img))
				b.StartTimer()
			}
			b.ReportMetric(float64(frozen.Microseconds())/1000/float64(b.N), "frozen-ms/op")
			b.ReportMetric(float64(restore.Microseconds())/1000/float64(b.N), "restore-ms/op")
		})
	}
}
