package main

import (
	"context"
	"os"
	"strconv"

	"github.com/ferrycr/ferry/internal/hooks"
)

// actionScripts runs criu's --action-script programs: each gets
// CRTOOLS_SCRIPT_ACTION naming the stage, CRTOOLS_IMAGE_DIR, and, for the
// stages of a restore that has a root process, CRTOOLS_INIT_PID. A script
// that fails fails the stage (a dump before its commit resumes the
// process; a restore before the resume removes what it built).
type actionScripts struct {
	scripts []string
	dir     string
	notify  notifier
}

// notifier sends a stage to criu's RPC client and waits for its answer.
type notifier func(stage string, pid int) error

type notifierKey struct{}

// orphanKey carries, for a restore, where the masters of the terminals
// it makes for slaves whose master was outside the dump go (criu's
// orphan-pts-master notification: restorecore.Options.OrphanPtsMaster).
type orphanKey struct{}

// orphanMasters returns ctx's receiver of terminal masters, if any.
func orphanMasters(ctx context.Context) func(*os.File) error {
	f, _ := ctx.Value(orphanKey{}).(func(*os.File) error)
	return f
}

func (a *actionScripts) run(stage string, pid int) error {
	if a.notify != nil {
		if err := a.notify(stage, pid); err != nil {
			return err
		}
	}
	h := hooks.Scripts{Paths: a.scripts, Env: []string{"CRTOOLS_IMAGE_DIR=" + a.dir}}
	if pid > 0 {
		return h.Run(stage, "CRTOOLS_INIT_PID="+strconv.Itoa(pid))
	}
	return h.Run(stage)
}

// dumpHook adapts run to dumpcore's Options.Action.
func (a *actionScripts) dumpHook() func(string) error {
	if len(a.scripts) == 0 && a.notify == nil {
		return nil
	}
	return func(stage string) error { return a.run(stage, 0) }
}

// restoreHook adapts run to restorecore's Options.Action.
func (a *actionScripts) restoreHook() func(string, int) error {
	if len(a.scripts) == 0 && a.notify == nil {
		return nil
	}
	return a.run
}
