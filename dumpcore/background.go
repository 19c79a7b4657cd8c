package dumpcore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
)

// A background snapshot copies memory while the process runs, in rounds
// stored as DIR/precopy-N, each holding what was written during the one
// before; when a round is small, the final dump freezes the process, copies
// only what was written during the last round together with every other
// piece of state, and lets it go. The image equals the process at that
// freeze, and the freeze lasts as long as copying what one short round
// dirtied, not as long as copying the memory.
const (
	precopyPrefix    = "precopy-"
	maxPrecopyRounds = 4
	// smallRound: a round that wrote no more pages than this (4 MiB) ends
	// the pre-copy.
	smallRound = 1024
	// flagAttempts: final dumps that take the VMA flags from before the
	// freeze (FlagsBeforeFreeze); the last attempt reads them frozen.
	flagAttempts = 2
)

// Background takes a background snapshot of opts.Pid into opts.ImagesDir
// (see above) and leaves the process running. opts.TrackMem keeps the
// dirty tracker in the process for a later snapshot with PrevImagesDir;
// PrevImagesDir makes the first round incremental on that image set.
func Background(ctx context.Context, opts Options) (*Result, error) {
	start := time.Now()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Timeout == 0 {
		opts.Timeout = 10 * time.Second
	}
	log := opts.Logger
	if opts.LeaveStopped || opts.PreDump || opts.LazyServe != nil || opts.PageSink != nil {
		return nil, errors.New("a background snapshot leaves the process running and writes its images locally")
	}
	dir := opts.ImagesDir
	if err := clearRounds(dir); err != nil {
		return nil, err
	}
	prev := opts.PrevImagesDir         // relative to dir unless absolute
	inRound := func(p string) string { // the same directory, seen from a round
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join("..", p)
	}
	var written []uint64
	round := 0
	for round < maxPrecopyRounds {
		round++
		name := precopyPrefix + strconv.Itoa(round)
		o := opts
		o.ImagesDir, o.PreDump, o.LeaveRunning, o.TrackMem, o.PrevImagesDir = filepath.Join(dir, name), true, false, false, inRound(prev)
		o.Frozen = nil
		if err := os.Mkdir(o.ImagesDir, 0o755); err != nil {
			return nil, err
		}
		res, err := Dump(ctx, o)
		if err != nil {
			return nil, fmt.Errorf("pre-copy round %d: %w", round, err)
		}
		prev = name
		n := res.Stats.PagesWritten
		written = append(written, n)
		log.Info("pre-copy round done", "round", round, "pages", n, "frozen", time.Duration(res.Stats.FrozenTimeUs)*time.Microsecond)
		if !hasTracker(o.ImagesDir) {
			log.Warn("no dirty tracking in this process: the final dump copies all memory while it is frozen")
			break
		}
		if n <= smallRound || round > 1 && n*2 > written[round-2] {
			break // small, or no longer shrinking
		}
	}

	final := opts
	final.LeaveRunning, final.TrackMem = true, true
	for attempt := 1; ; attempt++ {
		final.PrevImagesDir = prev
		final.FlagsBeforeFreeze = attempt <= flagAttempts
		res, err := Dump(ctx, final)
		if err != nil {
			return nil, err
		}
		if !res.FlagsMoved {
			if !opts.TrackMem {
				if err := dropTracker(opts, dir); err != nil {
					return nil, err
				}
			}
			res.Stats.TotalTimeUs = uint64(time.Since(start).Microseconds())
			if err := images.WriteAll(dir, "stats-dump", images.KindStats, &pb.Stats{Dump: res.Stats}); err != nil {
				return nil, err
			}
			log.Info("background snapshot taken", "pre-copy rounds", len(written), "pages per round", written,
				"final pages", res.Stats.PagesWritten, "frozen", time.Duration(res.Stats.FrozenTimeUs)*time.Microsecond)
			return res, nil
		}
		// The images are sound as a round: keep them as one and try again.
		round++
		name := precopyPrefix + strconv.Itoa(round)
		if err := demote(dir, name, inRound(prev)); err != nil {
			return nil, err
		}
		prev = name
	}
}

// clearRounds removes the pre-copy rounds of an earlier snapshot in dir.
func clearRounds(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("images directory: %w", err)
	}
	for _, e := range ents {
		if e.IsDir() && strings.HasPrefix(e.Name(), precopyPrefix) {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	return nil
}

func hasTracker(dir string) bool {
	var inv pb.Inventory
	return images.ReadOne(dir, "inventory.img", images.KindInventory, &inv) == nil && inv.TrackerFd > 0
}

// demote moves the image files of dir into the round dir/name, whose
// parent is parent (relative to the round).
func demote(dir, name, parent string) error {
	to := filepath.Join(dir, name)
	if err := os.Mkdir(to, 0o755); err != nil {
		return err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if e.Type().IsRegular() && (strings.HasSuffix(e.Name(), ".img") || e.Name() == "stats-dump") {
			if err := os.Rename(filepath.Join(dir, e.Name()), filepath.Join(to, e.Name())); err != nil {
				return err
			}
		}
	}
	var inv pb.Inventory
	if err := images.ReadOne(to, "inventory.img", images.KindInventory, &inv); err != nil {
		return err
	}
	inv.ParentDir = parent
	return images.WriteAll(to, "inventory.img", images.KindInventory, &inv)
}

// dropTracker takes the dirty trackers the final dump kept out of the
// running processes (removeTrackers) and clears them from the inventory.
func dropTracker(opts Options, dir string) error {
	var inv pb.Inventory
	if err := images.ReadOne(dir, "inventory.img", images.KindInventory, &inv); err != nil {
		return err
	}
	refs := inv.Trackers
	if inv.TrackerFd > 0 {
		refs = append([]*pb.TrackerRef{{Pid: int32(opts.Pid), Fd: inv.TrackerFd, Ino: inv.TrackerIno}}, refs...)
	}
	if len(refs) == 0 {
		return nil
	}
	tr := ptrace.NewThread()
	defer tr.Close()
	for _, ref := range refs {
		if info, err := proc.ReadFdInfo(int(ref.Pid), int(ref.Fd)); err != nil || info.Ino != ref.Ino {
			continue // the program closed it, or the process is gone
		}
		o := opts
		o.Pid = int(ref.Pid)
		if err := tr.Do(func() error { return removeTrackers(o, opts.Logger, []int{int(ref.Fd)}) }); err != nil {
			return fmt.Errorf("removing the dirty tracker from %d: %w", ref.Pid, err)
		}
	}
	inv.TrackerFd, inv.TrackerIno, inv.Trackers = 0, 0, nil
	return images.WriteAll(dir, "inventory.img", images.KindInventory, &inv)
}
