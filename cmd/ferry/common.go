package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/spf13/pflag"
)

// common holds the options every criu-style command shares.
type common struct {
	imagesDir string
	workDir   string
	logFile   string
	verbosity int
	logOut    io.Closer
	scripts   []string // --action-script
}

func (c *common) addFlags(fs *pflag.FlagSet) {
	fs.StringVarP(&c.imagesDir, "images-dir", "D", ".", "directory of the image files")
	fs.StringVarP(&c.workDir, "work-dir", "W", "", "directory for logs and stats (default: the images directory)")
	fs.StringVarP(&c.logFile, "log-file", "o", "", "write the log to FILE, relative to the work directory (default: standard error)")
	fs.StringArrayVar(&c.scripts, "action-script", nil, "run SCRIPT at each stage, with CRTOOLS_SCRIPT_ACTION naming it (repeatable; see criu(8))")
	fs.CountVarP(&c.verbosity, "verbosity", "v", "more log output: -v, -vv, ... or -vN with N from 0 (errors) to 4 (debug); default 2 (warnings)")
}

// logger opens the log (criu's levels: 0-1 errors, 2 warnings, 3 info, 4 debug).
func (c *common) logger() (*slog.Logger, error) {
	level := 2
	if c.verbosity > 0 {
		level = 2 + c.verbosity
		if c.verbosity >= 100 { // -vN, see normalizeArgs
			level = c.verbosity - 100
		}
	}
	var sl slog.Level
	switch {
	case level <= 1:
		sl = slog.LevelError
	case level == 2:
		sl = slog.LevelWarn
	case level == 3:
		sl = slog.LevelInfo
	default:
		sl = slog.LevelDebug
	}
	var w io.Writer = os.Stderr
	if c.logFile != "" && c.logFile != "-" {
		path := c.logFile
		if !filepath.IsAbs(path) {
			path = filepath.Join(c.workDirOrImages(), path)
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o644)
		if err != nil {
			return nil, fmt.Errorf("log file: %w", err)
		}
		c.logOut = f
		w = f
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: sl})), nil
}

func (c *common) close() {
	if c.logOut != nil {
		c.logOut.Close()
	}
}

func (c *common) workDirOrImages() string {
	if c.workDir != "" {
		return c.workDir
	}
	return c.imagesDir
}

var verbosityArg = regexp.MustCompile(`^-v([0-9])$`)

// normalizeArgs rewrites criu spellings pflag cannot parse: "-v4" (level 4)
// becomes "--verbosity=104", which logger() decodes as an absolute level.
func normalizeArgs(args []string) []string {
	out := make([]string, 0, len(args))
	for _, a := range args {
		if a == "--" {
			out = append(out, args[len(out):]...)
			return out
		}
		if m := verbosityArg.FindStringSubmatch(a); m != nil {
			n, _ := strconv.Atoi(m[1])
			a = "--verbosity=" + strconv.Itoa(100+n)
		}
		out = append(out, a)
	}
	return out
}

// parseSize parses a byte count with an optional K, M or G suffix.
func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"), strings.HasSuffix(s, "k"):
		mult, s = 1<<10, s[:len(s)-1]
	case strings.HasSuffix(s, "M"), strings.HasSuffix(s, "m"):
		mult, s = 1<<20, s[:len(s)-1]
	case strings.HasSuffix(s, "G"), strings.HasSuffix(s, "g"):
		mult, s = 1<<30, s[:len(s)-1]
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	return n * mult, nil
}

// writePidfile writes pid to path, as criu's --pidfile does.
func writePidfile(path string, pid int) error {
	if path == "" {
		return nil
	}
	return os.WriteFile(path, []byte(strconv.Itoa(pid)+"\n"), 0o644)
}

// actions returns the --action-script runner for this command; in criu's
// RPC service (swrk) it also sends each stage to the client as a
// notification (ctx carries the notifier).
func (c *common) actions(ctx context.Context) *actionScripts {
	n, _ := ctx.Value(notifierKey{}).(notifier)
	return &actionScripts{scripts: c.scripts, dir: c.imagesDir, notify: n}
}
