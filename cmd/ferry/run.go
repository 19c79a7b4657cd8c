package main

import (
	"errors"
	"fmt"
	"io"
	"os"
)

// exitError carries a process exit status out of a subcommand without
// printing anything more (restore without -d exits with the root's status).
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func run(args []string) int { return runIO(args, os.Stdout, os.Stderr) }

// runIO runs one ferry command line and returns its exit status.
func runIO(args []string, stdout, stderr io.Writer) int {
	root := newRoot()
	root.SetArgs(normalizeArgs(args))
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.Execute()
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	fmt.Fprintf(stderr, "Error: %v\n", err)
	return 1
}
