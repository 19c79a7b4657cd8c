package main

import (
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/ferrycr/ferry/internal/kernel"
)

func init() { register(newCheckCmd) }

func newCheckCmd() *cobra.Command {
	var (
		all     bool
		feature string
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "check [--all] [--feature NAME|list] [--json]",
		Short: "check that the kernel has what ferry needs",
		Long: `Probe the kernel mechanisms ferry uses, each for real (a short-lived child
process serves the ptrace probes), and report.

Without options only the features every dump and restore needs are probed:
"Looks good." and exit status 0 when all are present; otherwise one line per
missing feature naming it and the Linux version that has it, and exit
status 1.

--all also probes the optional features (lazy pages, dirty tracking for
pre-dump, POSIX timer ids): missing ones are listed, and the exit status
stays 0 as long as the required ones are there. The dirty tracker pre-dump
would use is named.

--feature NAME probes one feature (exit 1 if missing); --feature list lists
the names. --json prints the results as a JSON array.`,
		Example: `  ferry check
  ferry check --all
  ferry check --feature uffd-wp-async
  ferry check --all --json | jq '.[] | select(.ok == false)'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			out := cmd.OutOrStdout()
			p := kernel.Default()
			if feature == "list" {
				for _, f := range kernel.Features() {
					req := "optional"
					if f.Required {
						req = "required"
					}
					fmt.Fprintf(out, "%-20s %-8s Linux %-6s %s\n", f.Name, req, f.MinKernel, f.Description)
				}
				return nil
			}
			if feature != "" {
				if err := p.Check(feature); err != nil {
					return err
				}
				fmt.Fprintf(out, "%s is supported\n", feature)
				return nil
			}
			var results []kernel.Result
			for _, r := range p.All() {
				if r.Required || all {
					results = append(results, r)
				}
			}
			if asJSON {
				type row struct {
					Name      string `json:"name"`
					OK        bool   `json:"ok"`
					Required  bool   `json:"required"`
					MinKernel string `json:"min_kernel"`
					Detail    string `json:"detail,omitempty"`
				}
				var rows []row
				for _, r := range results {
					rw := row{Name: r.Name, OK: r.OK(), Required: r.Required, MinKernel: r.MinKernel}
					if r.Err != nil {
						rw.Detail = r.Err.Error()
					}
					rows = append(rows, rw)
				}
				b, _ := json.MarshalIndent(rows, "", "  ")
				fmt.Fprintln(out, string(b))
			}
			var reqMissing, optMissing int
			for _, r := range results {
				if r.OK() {
					continue
				}
				if r.Required {
					reqMissing++
					if !asJSON {
						fmt.Fprintf(cmd.ErrOrStderr(), "Error: %v\n", r.Err)
					}
				} else {
					optMissing++
					if !asJSON {
						fmt.Fprintf(out, "Warn: %v\n", r.Err)
					}
				}
			}
			if reqMissing > 0 {
				return &exitError{code: 1}
			}
			if asJSON {
				return nil
			}
			if all {
				fmt.Fprintf(out, "Dirty tracking for pre-dump: %s\n", p.DirtyTracker())
			}
			if optMissing > 0 {
				fmt.Fprintln(out, "Looks good, but optional features listed above are missing: dumps or restores that need them will fail.")
				return nil
			}
			fmt.Fprintln(out, "Looks good.")
			return nil
		},
	}
	fs := cmd.Flags()
	fs.BoolVar(&all, "all", false, "also probe optional features")
	fs.StringVar(&feature, "feature", "", "probe one feature NAME, or 'list' the names")
	fs.BoolVar(&asJSON, "json", false, "print results as JSON")
	return cmd
}
