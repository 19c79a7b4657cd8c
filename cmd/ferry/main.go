// Command ferry checkpoints and restores running Linux process trees.
//
// The command line follows criu(8): the same command names, options, exit
// codes and messages, so scripts written for criu carry over. Each
// subcommand lives in its own file; this file only builds the root.
package main

import (
	"os"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
)

// version is set by the Makefile with -ldflags.
var version = "dev"

// subcommands are registered by each subcommand's file in init.
var subcommands []func() *cobra.Command

func register(f func() *cobra.Command) { subcommands = append(subcommands, f) }

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:   "ferry",
		Short: "checkpoint, restore and live-migrate running Linux processes",
		Long: `ferry freezes a running process tree, writes its complete state (memory,
registers, files, signals, timers, threads) as images, and recreates the very
same processes later or on another host.

Its vocabulary is criu(8)'s: dump, pre-dump, restore, check, show.`,
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().String("config", "", "read options from FILE too (criu's syntax; see README)")
	root.PersistentFlags().Bool("no-default-config", false, "do not read the default configuration files")
	for _, f := range subcommands {
		root.AddCommand(f())
	}
	return root
}

func main() {
	if os.Getenv("GOGC") == "" && os.Getenv("GOMEMLIMIT") == "" {
		// ferry's heap is mostly long-lived indexes (pagemap entries, page
		// runs: ~10 MiB for a fragmented 4 GiB process) built on the
		// critical path; collecting at every doubling of a small heap
		// costs more there than the memory saved. A soft limit keeps the
		// rare large heap in bounds.
		debug.SetGCPercent(400)
		debug.SetMemoryLimit(1 << 30)
	}
	if path := os.Getenv("FERRY_CPUPROFILE"); path != "" {
		// For developers: a CPU profile of this run (go tool pprof); %p
		// in the path is the PID (agents of one test).
		path = strings.ReplaceAll(path, "%p", strconv.Itoa(os.Getpid()))
		if f, err := os.Create(path); err == nil && pprof.StartCPUProfile(f) == nil {
			code := run(os.Args[1:])
			pprof.StopCPUProfile()
			f.Close()
			os.Exit(code)
		}
	}
	os.Exit(run(os.Args[1:]))
}
