package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/ferrycr/ferry/internal/kernel"
)

func init() { register(newCheckCmd) }

const checkLong = `Check that the running kernel has what ferry needs, as criu check does.

Every feature is probed by using it, never by comparing version numbers: a
throwaway child process (a 129-byte program run from a memfd) is seized,
interrupted, inspected and killed; a userfaultfd write-protects a page of
ferry's own memory; PAGEMAP_SCAN reads pages ferry just wrote. Probes leave
nothing behind: their children are killed and reaped, their fds closed,
their mappings unmapped. The Linux release shown for a feature is the first
that has it; it only explains a failure.

Without options, only the features that every dump and restore needs are
probed. If all are present, "Looks good." is printed. Otherwise each missing
feature is printed on a line of its own (its name, what it is, the Linux
release that has it and why the probe failed) and the exit status is 1.

--all probes every feature and prints them all as a table (FEATURE, STATUS,
LINUX, USE, DETAIL), STATUS being "ok", "missing" (the kernel lacks it) or
"failed" (the probe could not tell, e.g. for lack of permission), USE
"required", "optional" or "info". The dirty-tracker row names the dirty-page
tracker pre-dump would use. If only optional features
are missing, the verdict is "Looks good, but optional features listed
above are missing: ..." and the exit status is still 0 (criu check --all exits non-zero
here): ferry runs, and only dumps or restores that need the missing
features will fail.

--feature NAME probes one feature: "NAME is supported" and exit status 0,
or an error and exit status 1. --feature list prints the feature names.

--json prints the selected results as a JSON array of objects with the
fields name, ok, required, min_kernel, detail and (when not ok) error;
with --feature list, the features as name, required, min_kernel and
description. The exit status is the same as without --json.

FEATURES
%s
EXIT STATUS
  0  every probed feature is present (with --all: every required one)
  1  a required feature, or the one given with --feature, is missing or
     could not be probed; or the command line is wrong`

func newCheckCmd() *cobra.Command {
	var (
		all     bool
		feature string
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "check [--all | --feature NAME|list] [--json]",
		Short: "check that the kernel supports checkpoint/restore",
		Long:  fmt.Sprintf(checkLong, featureHelp(kernel.New().All())),
		Example: `  ferry check                            # what every dump and restore needs
  ferry check --all                      # every feature, as a table
  ferry check --feature uffd-wp-async    # one feature
  ferry check --feature list             # the feature names
  ferry check --all --json | jq -r '.[] | select(.ok | not) | .name'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p := kernel.Default()
			out := cmd.OutOrStdout()
			switch {
			case feature == "list":
				return checkList(out, p, asJSON)
			case feature != "":
				return checkOne(out, p, feature, asJSON)
			}
			var names []string
			for _, f := range p.All() {
				if all || f.Required {
					names = append(names, f.Name)
				}
			}
			return checkMany(out, p, p.Results(names...), all, asJSON)
		},
	}
	fs := cmd.Flags()
	fs.BoolVar(&all, "all", false, "probe every feature, optional ones too, and print them all")
	fs.StringVar(&feature, "feature", "", "probe only feature `NAME`; \"list\" prints the names")
	fs.BoolVar(&asJSON, "json", false, "print the results as a JSON array")
	cmd.MarkFlagsMutuallyExclusive("all", "feature")
	return cmd
}

// featureHelp lists the features for the help text.
func featureHelp(fs []kernel.Feature) string {
	var b strings.Builder
	for _, f := range fs {
		fmt.Fprintf(&b, "  %s (%s)\n      %s\n", f.Name, featureUse(f), f.Description)
	}
	return b.String()
}

func featureUse(f kernel.Feature) string {
	if f.MinKernel == "" {
		return use(f)
	}
	return use(f) + ", Linux " + f.MinKernel
}

// use says whether a feature is required, optional, or only informs (a
// choice or a description, not tied to a kernel release).
func use(f kernel.Feature) string {
	switch {
	case f.Required:
		return "required"
	case f.MinKernel == "":
		return "info"
	}
	return "optional"
}

func checkList(out io.Writer, p *kernel.Probes, asJSON bool) error {
	if !asJSON {
		for _, n := range p.Names() {
			fmt.Fprintln(out, n)
		}
		return nil
	}
	type row struct {
		Name        string `json:"name"`
		Required    bool   `json:"required"`
		MinKernel   string `json:"min_kernel"`
		Description string `json:"description"`
	}
	rows := []row{}
	for _, f := range p.All() {
		rows = append(rows, row{f.Name, f.Required, f.MinKernel, f.Description})
	}
	return writeJSON(out, rows)
}

func checkOne(out io.Writer, p *kernel.Probes, name string, asJSON bool) error {
	r := p.Result(name)
	if errors.Is(r.Err, kernel.ErrUnknownFeature) {
		return r.Err
	}
	if asJSON {
		if err := writeJSON(out, []checkRow{newCheckRow(r)}); err != nil {
			return err
		}
		if !r.OK {
			return &exitError{code: 1}
		}
		return nil
	}
	if !r.OK {
		return r.Err
	}
	if r.Detail != "" {
		fmt.Fprintf(out, "%s is supported (%s)\n", name, r.Detail)
	} else {
		fmt.Fprintf(out, "%s is supported\n", name)
	}
	return nil
}

func checkMany(out io.Writer, p *kernel.Probes, results []kernel.Result, all, asJSON bool) error {
	var reqBad, optBad int
	for _, r := range results {
		switch {
		case r.OK:
		case r.Required:
			reqBad++
		default:
			optBad++
		}
	}
	switch {
	case asJSON:
		rows := make([]checkRow, len(results))
		for i, r := range results {
			rows[i] = newCheckRow(r)
		}
		if err := writeJSON(out, rows); err != nil {
			return err
		}
		if reqBad > 0 {
			return &exitError{code: 1}
		}
		return nil
	case all:
		fmt.Fprintf(out, "Linux %s\n", p.Kernel())
		tw := tabwriter.NewWriter(out, 0, 8, 2, ' ', 0)
		fmt.Fprintln(tw, "FEATURE\tSTATUS\tLINUX\tUSE\tDETAIL")
		for _, r := range results {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Name, status(r), dash(r.MinKernel), use(r.Feature), dash(detail(r)))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	default:
		for _, r := range results {
			if !r.OK {
				fmt.Fprintln(out, missingLine(r, p.Kernel()))
			}
		}
	}
	switch {
	case reqBad > 0:
		return fmt.Errorf("%d of the features every dump and restore needs %s missing or could not be probed",
			reqBad, plural(reqBad, "is", "are"))
	case optBad > 0:
		fmt.Fprintln(out, "Looks good, but optional features listed above are missing:\n"+
			"dumps or restores that need them will fail.")
	default:
		fmt.Fprintln(out, "Looks good.")
	}
	return nil
}

// checkRow is one feature in --json output.
type checkRow struct {
	Name      string `json:"name"`
	OK        bool   `json:"ok"`
	Required  bool   `json:"required"`
	MinKernel string `json:"min_kernel"`
	Detail    string `json:"detail"`
	Error     string `json:"error,omitempty"`
}

func newCheckRow(r kernel.Result) checkRow {
	row := checkRow{Name: r.Name, OK: r.OK, Required: r.Required, MinKernel: r.MinKernel, Detail: detail(r)}
	if r.Err != nil {
		row.Error = r.Err.Error()
	}
	return row
}

func writeJSON(out io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(out, string(b))
	return err
}

func status(r kernel.Result) string {
	switch {
	case r.OK:
		return "ok"
	case errors.Is(r.Err, kernel.ErrNotSupported):
		return "missing"
	}
	return "failed"
}

// detail is what the probe saw: its detail when OK, else the reason it
// failed (without the FeatureError preamble, which the other fields carry).
func detail(r kernel.Result) string {
	if r.OK {
		return r.Detail
	}
	var fe *kernel.FeatureError
	if errors.As(r.Err, &fe) {
		return fe.Err.Error()
	}
	return r.Err.Error()
}

// missingLine describes a feature that is not OK on one line.
func missingLine(r kernel.Result, running string) string {
	if status(r) == "failed" {
		return fmt.Sprintf("%s (%s): could not be probed: %s", r.Name, r.Description, detail(r))
	}
	if r.MinKernel == "" {
		return fmt.Sprintf("%s (%s): not available: %s", r.Name, r.Description, detail(r))
	}
	return fmt.Sprintf("%s (%s): not available, needs Linux %s (running %s): %s",
		r.Name, r.Description, r.MinKernel, running, detail(r))
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
