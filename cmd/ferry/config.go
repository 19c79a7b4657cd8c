package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Configuration files, criu's syntax: one option per line, its long name
// without the dashes, then its value if it takes one ("tcp-established",
// "images-dir /srv/ckpt", values with spaces in double quotes); "#" starts
// a comment. They are read in this order, each overriding the ones before,
// and the command line overrides them all:
//
//	/etc/criu/default.conf, /etc/ferry/default.conf,
//	~/.criu/default.conf, ~/.ferry/default.conf   (unless --no-default-config)
//	$CRIU_CONFIG_FILE, $FERRY_CONFIG_FILE
//	--config FILE
//
// Options that repeat (--action-script) add up instead. An option another
// ferry command takes is ignored; one no command knows is an error naming
// the file and line.
func defaultConfigs() []string {
	files := []string{"/etc/criu/default.conf", "/etc/ferry/default.conf"}
	if home, err := os.UserHomeDir(); err == nil {
		files = append(files, filepath.Join(home, ".criu", "default.conf"), filepath.Join(home, ".ferry", "default.conf"))
	}
	return files
}

// withConfig returns args with the options of the configuration files put
// right after the subcommand, so that the command line wins.
func withConfig(root *cobra.Command, args []string) ([]string, error) {
	cmd, rest, err := root.Find(args)
	if err != nil || cmd == root {
		return args, nil // cobra reports what is wrong
	}
	var explicit string
	noDefault := false
scan:
	for i, a := range rest {
		switch {
		case a == "--":
			break scan
		case a == "--no-default-config":
			noDefault = true
		case a == "--config" && i+1 < len(rest):
			explicit = rest[i+1]
		case strings.HasPrefix(a, "--config="):
			explicit = strings.TrimPrefix(a, "--config=")
		}
	}
	var files []string
	if !noDefault {
		for _, f := range defaultConfigs() {
			if _, err := os.Stat(f); err == nil {
				files = append(files, f)
			}
		}
	}
	for _, env := range []string{"CRIU_CONFIG_FILE", "FERRY_CONFIG_FILE"} {
		if f := os.Getenv(env); f != "" {
			files = append(files, f)
		}
	}
	if explicit != "" {
		files = append(files, explicit)
	}
	var extra []string
	for _, f := range files {
		opts, err := readConfig(root, cmd, f)
		if err != nil {
			return nil, err
		}
		extra = append(extra, opts...)
	}
	if len(extra) == 0 {
		return args, nil
	}
	path := strings.Fields(cmd.CommandPath())[1:] // without "ferry"
	out := append(append(append([]string(nil), path...), extra...), rest...)
	return out, nil
}

// readConfig turns the file's lines into command-line options of cmd.
func readConfig(root, cmd *cobra.Command, file string) ([]string, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("config file: %w", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		name, value, hasValue, err := configLine(sc.Text())
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %w", file, n, err)
		}
		if name == "" || name == "config" || name == "no-default-config" {
			continue
		}
		fl := cmd.Flags().Lookup(name)
		if fl == nil {
			fl = cmd.InheritedFlags().Lookup(name)
		}
		if fl == nil {
			if !anyCommandHas(root, name) {
				return nil, fmt.Errorf("%s:%d: unknown option %q", file, n, name)
			}
			continue // for another command
		}
		switch {
		case fl.NoOptDefVal != "" && !hasValue:
			out = append(out, "--"+name)
		case !hasValue:
			return nil, fmt.Errorf("%s:%d: option %q needs a value", file, n, name)
		default:
			out = append(out, "--"+name+"="+value)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return out, nil
}

// configLine splits one line into an option name and its value.
func configLine(line string) (name, value string, hasValue bool, err error) {
	line = strings.TrimSpace(line)
	if line == "" || line[0] == '#' {
		return "", "", false, nil
	}
	name, rest, _ := strings.Cut(line, " ")
	name = strings.TrimPrefix(strings.TrimSpace(name), "--")
	rest = strings.TrimSpace(rest)
	if i := strings.Index(rest, " #"); i >= 0 && !strings.HasPrefix(rest, `"`) {
		rest = strings.TrimSpace(rest[:i])
	}
	if rest == "" || rest[0] == '#' {
		return name, "", false, nil
	}
	if rest[0] == '"' {
		end := strings.IndexByte(rest[1:], '"')
		if end < 0 {
			return "", "", false, errors.New("unterminated quote")
		}
		return name, rest[1 : end+1], true, nil
	}
	return name, rest, true, nil
}

func anyCommandHas(root *cobra.Command, name string) bool {
	found := false
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		c.Flags().VisitAll(func(f *pflag.Flag) {
			if f.Name == name {
				found = true
			}
		})
		for _, s := range c.Commands() {
			walk(s)
		}
	}
	walk(root)
	return found
}
