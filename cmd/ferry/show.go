package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/ferrycr/ferry/images"
)

func init() { register(newShowCmd) }

const showLong = `Decode ferry image files to JSON on standard output, as crit show does for
criu images. The kind of each file is read from its header, never guessed
from its name.

Given a FILE, ferry prints one object:

  {
      "magic": "FERRYIMG",
      "kind": "core",
      "version": "1.0",
      "entries": [ {...}, ... ]
  }

"kind" is one of inventory, pstree, core, mm, pagemap, files, fdinfo,
stats, ghost and pages; "version" is the format version the file was
written in; "entries" holds the file's records in order, each in the
protobuf JSON mapping with the field names of images/ferry.proto. As that
mapping has it, fields at their zero value are left out, 64-bit integers
are strings ("4096") and bytes are base64. A pagemap file's first entry
is its head (pages_id, compression), the others its page runs.

A pages file holds raw page data, which is not printed; its object has
"size", the bytes of page data, and "pages", that size in 4096-byte pages,
in place of "entries".

Given a DIR, ferry prints one object keyed by file name, in name order,
with every image file of the directory: *.img and stats-* (stats-dump,
stats-restore). Other files and subdirectories are ignored.

Every record's checksum is verified. A corrupt or truncated file, or one
of an unknown kind or a newer format version, is reported with the file
name and byte offset of the problem, and nothing is printed.

EXIT STATUS
  0  everything decoded and printed
  1  a file could not be read or decoded, or DIR holds no image file`

func newShowCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "show DIR|FILE",
		Short: "decode images to JSON",
		Long:  showLong,
		Example: `  # the whole image set
  ferry show ckpt

  # one process's registers and threads
  ferry show ckpt/core-1234.img

  # how many VMAs the process had
  ferry show ckpt | jq '."mm-1234.img".entries[0].vmas | length'

  # the frozen time of the last dump, in microseconds
  ferry show ckpt/stats-dump | jq -r '.entries[0].dump.frozen_time_us'`,
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
