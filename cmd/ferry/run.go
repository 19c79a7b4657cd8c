package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// exitError carries a process exit status out of a subcommand without
// printing anything more (restore without -d exits with the root's status).
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// run runs the command line of the ferry binary. SIGINT, SIGTERM and
// SIGHUP cancel the command's context instead of killing ferry outright:
// a dump interrupted that way releases the frozen process as it found it
// (a ferry killed mid-dump would leave it with every signal blocked), a
// restore removes what it built, a daemon stops serving.
func run(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	return runContext(ctx, args, os.Stdout, os.Stderr)
}

// runIO runs one ferry command line and returns its exit status.
func runIO(args []string, stdout, stderr io.Writer) int {
	return runContext(context.Background(), args, stdout, stderr)
}

func runContext(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRoot()
	args, err := withConfig(root, normalizeArgs(args))
	if err != nil {
		fmt.Fprintf(stderr, "Error: %v\n", err)
		return 1
	}
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err = root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	if ctx.Err() != nil {
		fmt.Fprintf(stderr, "Error: interrupted: %v\n", err)
		return 1
	}
	fmt.Fprintf(stderr, "Error: %v\n", err)
	return 1
}
