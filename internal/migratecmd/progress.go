package migratecmd

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/coordinator"
)

// display prints a migration's events for people: a line per step and,
// on a terminal, a live bar for the round under way (bytes sent of those
// expected, rate, dirty rate, ETA).
type display struct {
	out   io.Writer
	tty   bool
	p     *mpb.Progress // while a round's bar shows
	bar   *mpb.Bar
	round int
	dirty string  // the dirty rate last measured, for the bar
	rate  float64 // bytes per second the round sends at
}

func newDisplay(out io.Writer) *display {
	f, ok := out.(*os.File)
	return &display{out: out, tty: ok && isTerminal(f)}
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// event shows e.
func (d *display) event(e coordinator.Event) {
	if e.Event == "progress" {
		d.progress(e)
		return
	}
	if e.Event == "round" && e.DirtyRate > 0 {
		d.dirty = coordinator.Size(uint64(e.DirtyRate)) + "/s"
	}
	d.endBar()
	printEvent(d.out, e)
}

func (d *display) progress(e coordinator.Event) {
	if !d.tty {
		return
	}
	if d.bar != nil && d.round != e.Round {
		d.endBar()
	}
	if d.bar == nil {
		d.round = e.Round
		d.p = mpb.New(mpb.WithOutput(d.out), mpb.WithAutoRefresh(), mpb.WithWidth(32), mpb.WithRefreshRate(100*time.Millisecond))
		d.bar = d.p.AddBar(int64(max(e.Total, e.Bytes+1)), mpb.BarRemoveOnComplete(),
			mpb.PrependDecorators(decor.Name(fmt.Sprintf("  round %d ", e.Round))),
			mpb.AppendDecorators(
				decor.Counters(decor.SizeB1024(0), " % .1f / % .1f"),
				decor.Any(func(st decor.Statistics) string {
					s := ""
					if d.rate > 0 {
						s = "  " + coordinator.Size(uint64(d.rate)) + "/s"
					}
					if d.dirty != "" {
						s += "  dirty " + d.dirty
					}
					if left := st.Total - st.Current; d.rate > 0 && left > 0 {
						s += "  ETA " + time.Duration(float64(left)/d.rate*float64(time.Second)).Round(100*time.Millisecond).String()
					}
					return s
				}),
			))
	}
	if e.Bytes >= e.Total {
		// Sent more than expected: the end moves with it.
		d.bar.SetTotal(int64(e.Bytes+e.Bytes/10+1), false)
	}
	d.rate = e.Rate
	d.bar.SetCurrent(int64(e.Bytes))
}

// endBar removes the bar of the round that ended, if any.
func (d *display) endBar() {
	if d.bar == nil {
		return
	}
	d.bar.SetTotal(-1, true)
	d.p.Wait()
	d.p, d.bar = nil, nil
}

// close removes what the display still shows, before the summary.
func (d *display) close() { d.endBar() }
