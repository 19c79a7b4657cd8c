// Package hooks runs action scripts, criu's --action-script: each script
// gets CRTOOLS_SCRIPT_ACTION naming the stage, plus the caller's variables.
package hooks

import (
	"fmt"
	"os"
	"os/exec"
)

// Scripts are the programs run at each stage, in order, with Env added to
// ferry's environment.
type Scripts struct {
	Paths []string
	Env   []string
}

// Run runs every script for stage, with extra variables (NAME=VALUE); the
// first that fails fails the stage. Their output goes to standard error.
func (s *Scripts) Run(stage string, extra ...string) error {
	for _, p := range s.Paths {
		cmd := exec.Command(p)
		cmd.Env = append(append(append(os.Environ(), "CRTOOLS_SCRIPT_ACTION="+stage), s.Env...), extra...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("action script %s (%s): %w", p, stage, err)
		}
	}
	return nil
}
