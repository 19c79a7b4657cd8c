package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/transport"
)

// BenchmarkMigrate measures live migrations between the two hosts of the
// e2e cluster: downtime and total time for each workload size, dirty rate
// and mode, with a stop-and-copy baseline done by ferry itself (precopy
// without pre-copy rounds: freeze, send all, restore), against the
// bandwidth of the link between the hosts (TLS, measured first).
//
//	FERRY_BENCH_SIZES=256,1024,4096 FERRY_BENCH_DIRTY=0,10,100 \
//	FERRY_BENCH_OUT=bench/migrate.json go test -run '^$' -bench Migrate -benchtime 1x ./e2e
//
// make bench runs it. Results are JSON: one row per migration, the
// targets and whether each was met.
func BenchmarkMigrate(b *testing.B) {
	sizes := envInts(b, "FERRY_BENCH_SIZES", "256,1024,4096")
	dirty := envInts(b, "FERRY_BENCH_DIRTY", "0,10,100")
	c := newCluster(b)
	if keep := os.Getenv("FERRY_BENCH_LOGS"); keep != "" {
		// The agents' logs (-v4: timings of every phase) outlive the run.
		if err := os.MkdirAll(keep, 0o755); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			for _, h := range []*host{c.a, c.b} {
				if data, err := os.ReadFile(h.log); err == nil {
					os.WriteFile(filepath.Join(keep, h.name+".log"), data, 0o644)
				}
			}
		})
	}
	bw := c.linkBandwidth(1 << 30)
	b.Logf("link A-B (TLS): %.0f MiB/s", bw)
	var modes []struct{ name, mode string }
	only := os.Getenv("FERRY_BENCH_MODES") // names, comma-separated; all if empty
	for _, m := range []struct{ name, mode string }{
		{"stop-and-copy", "precopy"}, {"precopy", "precopy"}, {"hybrid", "hybrid"}, {"postcopy", "postcopy"},
	} {
		if only == "" || slices.Contains(strings.Split(only, ","), m.name) {
			modes = append(modes, m)
		}
	}
	var rows []benchRow
	for _, size := range sizes {
		for _, d := range dirty {
			args := []string{"-m", strconv.Itoa(size), "-t", "2"}
			if d > 0 {
				args = append(args, "-C", "-c", strconv.Itoa(d))
			}
			w, pid := c.startWorkload(args...)
			before := w.Report(b)
			from, to := c.a, c.b
			for _, m := range modes {
				extra := []string{"--mode", m.mode, "--from", from.ip, "--to", to.ip}
				if m.name == "stop-and-copy" {
					extra = append(extra, "--max-rounds", "0")
				}
				code, evs := c.migrate(pid, extra...)
				res := evs[len(evs)-1]
				if code != 0 {
					b.Fatalf("%d MiB, %d MiB/s, %s: exit %d, %v", size, d, m.name, code, res)
				}
				p := to.find(pid)
				if p == 0 {
					b.Fatalf("%s: PID %d not on %s", m.name, pid, to.name)
				}
				// The next hop needs the PID free on this side again.
				old := w.Pid
				waitFor(b, "the source to be reaped", 10*time.Second, func() bool { return procState(old) == 0 })
				w.Pid = p
				checkSame(b, before, w.Report(b))
				from, to = to, from
				row := benchRow{SizeMiB: size, DirtyMiBs: d, Mode: m.name, BandwidthMiBs: bw}
				for _, e := range evs {
					if e["event"] == "preflight" {
						row.ResidentMiB = num(e["bytes"]) / (1 << 20)
					}
				}
				row.DowntimeMs, row.TotalMs = num(res["downtime_ms"]), num(res["total_ms"])
				row.FrozenMs, row.PostcopyMs = num(res["frozen_ms"]), num(res["postcopy_ms"])
				row.SentMiB, row.Rounds = num(res["bytes"])/(1<<20), int(num(res["rounds"]))
				row.IdealMs = row.ResidentMiB / bw * 1000
				row.TotalVsIdeal = row.TotalMs / row.IdealMs
				b.Logf("%5d MiB %3d MiB/s %-13s downtime %7.1f ms  total %7.0f ms (%.2f x size/bandwidth)  %d rounds",
					size, d, m.name, row.DowntimeMs, row.TotalMs, row.TotalVsIdeal, row.Rounds)
				rows = append(rows, row)
			}
			w.Kill()
		}
	}
	out := os.Getenv("FERRY_BENCH_OUT")
	if out == "" {
		return
	}
	rep := summarize(rows, bw)
	bs, _ := json.MarshalIndent(rep, "", "  ")
	if err := os.WriteFile(out, append(bs, '\n'), 0o644); err != nil {
		b.Fatal(err)
	}
	b.Logf("results in %s; targets: %+v", out, rep.Targets)
}

type benchRow struct {
	SizeMiB       int     `json:"size_mib"`
	DirtyMiBs     int     `json:"dirty_mib_s"`
	Mode          string  `json:"mode"`
	ResidentMiB   float64 `json:"resident_mib"`
	DowntimeMs    float64 `json:"downtime_ms"`
	FrozenMs      float64 `json:"frozen_ms"`
	PostcopyMs    float64 `json:"postcopy_ms"`
	TotalMs       float64 `json:"total_ms"`
	SentMiB       float64 `json:"sent_mib"`
	Rounds        int     `json:"rounds"`
	BandwidthMiBs float64 `json:"bandwidth_mib_s"`
	// IdealMs: resident memory over the link's bandwidth.
	IdealMs      float64 `json:"ideal_ms"`
	TotalVsIdeal float64 `json:"total_vs_ideal"`
}

type benchTarget struct {
	Target string  `json:"target"`
	Worst  float64 `json:"worst"`
	Limit  float64 `json:"limit"`
	Met    bool    `json:"met"`
}

type benchReport struct {
	BandwidthMiBs float64       `json:"bandwidth_mib_s"`
	Rows          []benchRow    `json:"rows"`
	Targets       []benchTarget `json:"targets"`
}

// summarize checks the rows against the targets: post-copy
// downtime at most 50 ms and flat across sizes (the largest size's median
// at most 1.5 times the smallest's), hybrid downtime at most 100 ms at
// 100 MiB/s, total time within 1.3 x size/bandwidth.
func summarize(rows []benchRow, bw float64) benchReport {
	r := benchReport{BandwidthMiBs: bw, Rows: rows}
	worst := func(keep func(benchRow) bool, val func(benchRow) float64) float64 {
		w := 0.0
		for _, x := range rows {
			if keep(x) && val(x) > w {
				w = val(x)
			}
		}
		return w
	}
	add := func(name string, w, limit float64) {
		r.Targets = append(r.Targets, benchTarget{Target: name, Worst: w, Limit: limit, Met: w <= limit})
	}
	downtime := func(x benchRow) float64 { return x.DowntimeMs }
	add("postcopy downtime ms", worst(func(x benchRow) bool { return x.Mode == "postcopy" }, downtime), 50)
	bySize := map[int][]float64{}
	for _, x := range rows {
		if x.Mode == "postcopy" {
			bySize[x.SizeMiB] = append(bySize[x.SizeMiB], x.DowntimeMs)
		}
	}
	if len(bySize) > 1 {
		var keys []int
		for k := range bySize {
			keys = append(keys, k)
		}
		sort.Ints(keys)
		add("postcopy downtime, largest over smallest size (medians)", median(bySize[keys[len(keys)-1]])/median(bySize[keys[0]]), 1.5)
	}
	add("hybrid downtime ms at 100 MiB/s", worst(func(x benchRow) bool { return x.Mode == "hybrid" && x.DirtyMiBs >= 100 }, downtime), 100)
	for _, m := range []string{"stop-and-copy", "precopy", "hybrid", "postcopy"} {
		add(m+" total / (size / bandwidth)", worst(func(x benchRow) bool { return x.Mode == m }, func(x benchRow) float64 { return x.TotalVsIdeal }), 1.3)
	}
	return r
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func num(v any) float64 {
	f, _ := v.(float64)
	return f
}

func envInts(tb testing.TB, name, def string) []int {
	s := os.Getenv(name)
	if s == "" {
		s = def
	}
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			tb.Fatalf("%s: %q is not a number", name, f)
		}
		out = append(out, n)
	}
	return out
}

// inNetns runs fn on a thread of its own that has joined the network
// namespace netns: sockets fn makes live there. The thread is discarded
// afterwards.
func inNetns(netns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with us
		f, err := os.Open(filepath.Join("/run/netns", netns))
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- os.NewSyscallError("setns", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// linkBandwidth sends n bytes from A to B over one TLS stream with the
// agents' certificates, as the page streams go, and returns MiB/s.
func (c *cluster) linkBandwidth(n int64) float64 {
	t := c.t
	tlsOf := func(h *host) transport.TLS {
		return transport.TLS{Enabled: true, CACert: filepath.Join(c.pki, "ca.crt"),
			Cert: filepath.Join(c.pki, h.name+".crt"), Key: filepath.Join(c.pki, h.name+".key")}
	}
	var l net.Listener
	if err := inNetns(c.b.netns, func() (err error) {
		l, err = transport.Listen(net.JoinHostPort(c.b.ip, "0"), tlsOf(c.b))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan error, 1)
	var took time.Duration
	go func() {
		s, err := l.Accept()
		if err != nil {
			got <- err
			return
		}
		defer s.Close()
		start := time.Now()
		_, err = io.CopyN(io.Discard, s, n)
		took = time.Since(start)
		got <- err
	}()
	var conn net.Conn
	if err := inNetns(c.a.netns, func() (err error) {
		conn, err = transport.Dial(context.Background(), l.Addr().String(), tlsOf(c.a))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 7919 >> 3) // not all zero; TLS does not compress anyway
	}
	go func() {
		for sent := int64(0); sent < n; sent += int64(len(buf)) {
			if _, err := conn.Write(buf); err != nil {
				return
			}
		}
	}()
	if err := <-got; err != nil {
		t.Fatalf("measuring the link: %v", err)
	}
	return float64(n) / (1 << 20) / took.Seconds()
}
