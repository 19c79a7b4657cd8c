package main

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
)

// actionScripts runs criu's --action-script programs: each gets
// CRTOOLS_SCRIPT_ACTION naming the stage, CRTOOLS_IMAGE_DIR, and, for the
// stages of a restore that has a root process, CRTOOLS_INIT_PID. A script
// that fails fails the stage (a dump before its commit resumes the
// process; a restore before the resume removes what it built).
type actionScripts struct {
	scripts []string
	dir     string
}

func (a *actionScripts) run(stage string, pid int) error {
	for _, s := range a.scripts {
		cmd := exec.Command(s)
		cmd.Env = append(os.Environ(), "CRTOOLS_SCRIPT_ACTION="+stage, "CRTOOLS_IMAGE_DIR="+a.dir)
		if pid > 0 {
			cmd.Env = append(cmd.Env, "CRTOOLS_INIT_PID="+strconv.Itoa(pid))
		}
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("action script %s (%s): %w", s, stage, err)
		}
	}
	return nil
}

// dumpHook adapts run to dumpcore's Options.Action.
func (a *actionScripts) dumpHook() func(string) error {
	if len(a.scripts) == 0 {
		return nil
	}
	return func(stage string) error { return a.run(stage, 0) }
}

// restoreHook adapts run to restorecore's Options.Action.
func (a *actionScripts) restoreHook() func(string, int) error {
	if len(a.scripts) == 0 {
		return nil
	}
	return a.run
}
