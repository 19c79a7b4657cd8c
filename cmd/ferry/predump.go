package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferrycr/ferry/dumpcore"
)

func init() { register(newPreDumpCmd) }

func newPreDumpCmd() *cobra.Command {
	var (
		c            common
		pid          int
		timeout      int
		freezeCg     string
		prevDir      string
		mode         string
		displayStats bool
		dedup        bool
		ps           psFlags
	)
	cmd := &cobra.Command{
		Use:   "pre-dump -t PID -D DIR [--prev-images-dir DIR] [options]",
		Short: "copy a running process's memory ahead of the final dump",
		Long: `Save the memory of process PID while it keeps running, so that a later
"ferry dump --prev-images-dir" (or another pre-dump) only has to copy the
pages written since. The process is frozen only long enough to list its
memory and arm dirty tracking; the pages are copied after it resumes.

Dirty tracking uses a userfaultfd in asynchronous write-protect mode with
the PAGEMAP_SCAN ioctl (Linux 6.7+; "ferry check --all" names the tracker).
The first pre-dump leaves that userfaultfd open inside the process, at a
high fd number recorded in the images; each later round takes it back, and
the final dump removes it. If the process closes it, the next round copies
all memory again. Without userfaultfd every round copies everything.

A pre-dump image directory holds memory only: restore from the final dump
directory, which refers to its parents through --prev-images-dir.

--pre-dump-mode: ferry always copies the way criu's "read" mode does, with
process_vm_readv while the process runs. criu's "splice" mode pins the pages
into pipes while the process is frozen, which would make the freeze grow
with memory; "splice" is accepted so that criu command lines work, and
copies the same way (the log says so).`,
		Example: `  ferry pre-dump -t 1234 -D ckpt/1
  ferry pre-dump -t 1234 -D ckpt/2 --prev-images-dir ../1
  ferry dump     -t 1234 -D ckpt/3 --prev-images-dir ../2
  ferry restore  -D ckpt/3`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if pid <= 0 {
				return errors.New("pre-dump: -t/--tree PID is required")
			}
			if mode != "read" && mode != "splice" {
				return fmt.Errorf("--pre-dump-mode %q: want read or splice", mode)
			}
			log, err := c.logger()
			if err != nil {
				return err
			}
			defer c.close()
			if mode == "splice" {
				log.Info("--pre-dump-mode splice: copying with process_vm_readv while the process runs (read mode), which keeps the freeze short")
			}
			sink, release, err := ps.sink(cmd)
			if err != nil {
				return err
			}
			defer release()
			acts := c.actions(cmd.Context())
			if err := acts.run("pre-dump", 0); err != nil {
				return fmt.Errorf("pre-dump: %w", err)
			}
			res, err := dumpcore.Dump(cmd.Context(), dumpcore.Options{
				Action:   acts.dumpHook(),
				PageSink: sink,
				Pid:      pid, ImagesDir: c.imagesDir, PreDump: true, PrevImagesDir: prevDir, Compress: ps.compress,
				Timeout: time.Duration(timeout) * time.Second, FreezeCgroup: freezeCg, Caller: callerOf(cmd.Context()), Version: version, Logger: log,
			})
			if err != nil {
				log.Error("pre-dump failed", "pid", pid, "err", err)
				return fmt.Errorf("pre-dump of %d failed: %w", pid, err)
			}
			if err := autoDedup(cmd, dedup, c.imagesDir); err != nil {
				return err
			}
			if displayStats {
				printDumpStats(cmd, res.Stats)
			}
			return nil
		},
	}
	fs := cmd.Flags()
	c.addFlags(fs)
	ps.addFlags(fs, true)
	fs.IntVarP(&pid, "tree", "t", 0, "the process to pre-dump")
	fs.IntVar(&timeout, "timeout", 10, "seconds to wait for the process to freeze")
	fs.StringVar(&freezeCg, "freeze-cgroup", "", "freeze the tree with the freezer of the cgroup at this directory before seizing it (as dump's)")
	fs.StringVar(&prevDir, "prev-images-dir", "", "the previous pre-dump, relative to -D: store only pages written since")
	fs.StringVar(&mode, "pre-dump-mode", "read", "how pages are copied: read (process_vm_readv); splice is accepted and reads too")
	fs.Bool("track-mem", true, "accepted for criu compatibility: pre-dump always tracks memory")
	fs.BoolVar(&dedup, "auto-dedup", false, "free parent page data this round stores again (see ferry dedup)")
	fs.BoolVar(&displayStats, "display-stats", false, "print statistics when done")
	return cmd
}
