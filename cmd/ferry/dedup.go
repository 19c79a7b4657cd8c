package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/ferrycr/ferry/images"
)

func init() { register(newDedupCmd) }

func newDedupCmd() *cobra.Command {
	var c common
	cmd := &cobra.Command{
		Use:   "dedup -D DIR",
		Short: "free page data of parent images that DIR stores again",
		Long: `In an incremental image chain (pre-dump, dump --prev-images-dir), a page
written between rounds is stored again by the later round, and the older
copies are never read when restoring the latest one. dedup punches those
copies out of every ancestor's pages file (they keep their size but lose
the blocks). The ancestors can then no longer be restored on their own.

"ferry dump --auto-dedup" and "ferry pre-dump --auto-dedup" do the same
right after writing their images.`,
		Example: `  ferry dedup -D ckpt/3`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			freed, err := images.Dedup(c.imagesDir)
			if err != nil {
				return fmt.Errorf("dedup: %w", err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "freed %d bytes of parent page data\n", freed)
			return nil
		},
	}
	c.addFlags(cmd.Flags())
	return cmd
}

// autoDedup runs dedup after a dump when asked.
func autoDedup(cmd *cobra.Command, on bool, dir string) error {
	if !on {
		return nil
	}
	if _, err := images.Dedup(dir); err != nil {
		return fmt.Errorf("--auto-dedup: %w", err)
	}
	return nil
}
