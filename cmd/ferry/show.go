package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/ferrycr/ferry/images"
)

func init() { register(newShowCmd) }

func newShowCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "show DIR|FILE",
		Short: "decode images to JSON",
		Long: `Decode an image file, or every image file of a directory, to JSON on
standard output (what crit does for criu images).

A single file prints as {"magic", "kind", "version", "entries": [...]};
a pages file prints its size and page count; a directory prints one object
keyed by file name. A corrupt or truncated image is reported with the file
name and byte offset, and the exit status is 1.`,
		Example: `  ferry show ckpt                    # the whole image set
  ferry show ckpt/core-1234.img      # one file
  ferry show ckpt | jq '."mm-1234.img".entries[0].vmas | length'`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := os.Stat(args[0])
			if err != nil {
				return err
			}
			if st.IsDir() {
				return images.ShowDir(cmd.OutOrStdout(), args[0])
			}
			return images.Show(cmd.OutOrStdout(), args[0])
		},
	}
}
