package main

import (
	"errors"

	"github.com/spf13/cobra"

	"github.com/ferrycr/ferry/internal/migratecmd"
)

func init() { register(newMigrateCmd) }

// newMigrateCmd is the migrate command under ferry, with its exit statuses.
func newMigrateCmd() *cobra.Command {
	cmd := migratecmd.New()
	run := cmd.RunE
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		err := run(cmd, args)
		var ee *migratecmd.ExitError
		if errors.As(err, &ee) {
			return &exitError{ee.Code}
		}
		return err
	}
	return cmd
}
