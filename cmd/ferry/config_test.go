package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/ferrycr/ferry/internal/testutil"
)

func TestConfigLine(t *testing.T) {
	for line, want := range map[string][3]string{
		"":                          {"", "", "false"},
		"# a comment":               {"", "", "false"},
		"tcp-established":           {"tcp-established", "", "false"},
		"  --ghost-limit 2M  ":      {"ghost-limit", "2M", "true"},
		`log-file "my log.txt"`:     {"log-file", "my log.txt", "true"},
		"images-dir /srv/x # where": {"images-dir", "/srv/x", "true"},
		"leave-running # keep it":   {"leave-running", "", "false"},
	} {
		n, v, has, err := configLine(line)
		if err != nil || n != want[0] || v != want[1] || strconv.FormatBool(has) != want[2] {
			t.Errorf("%q: %q %q %v %v, want %v", line, n, v, has, err, want)
		}
	}
	if _, _, _, err := configLine(`log-file "open`); err == nil {
		t.Error("an unterminated quote was accepted")
	}
}

func TestConfigFiles(t *testing.T) {
	// Options come from FERRY_CONFIG_FILE and --config (in that order),
	// the command line overrides both; an option of another command is
	// ignored, one nobody knows is refused with its file and line.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "4")
	defer w.Kill()
	dir := t.TempDir()
	envConf := filepath.Join(dir, "env.conf")
	os.WriteFile(envConf, []byte("# from the environment\nleave-running\nrestore-detached\nlog-file env.log\n"), 0o644)
	t.Setenv("FERRY_CONFIG_FILE", envConf)
	conf := filepath.Join(dir, "ferry.conf")
	os.WriteFile(conf, []byte("log-file \"config file.log\"\nverbosity\n"), 0o644)
	img := t.TempDir()
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--config", conf)
	// leave-running came from the environment's file.
	checkContinued(t, before, w.Report(t))
	// log-file: --config's value won over the environment's.
	if _, err := os.Stat(filepath.Join(img, "config file.log")); err != nil {
		t.Fatalf("the log named in --config is missing: %v", err)
	}
	// The command line wins over both.
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--config", conf, "-o", "cli.log")
	if _, err := os.Stat(filepath.Join(img, "cli.log")); err != nil {
		t.Fatalf("the command line's log file is missing: %v", err)
	}
	// --no-default-config does not drop --config, and an unknown option
	// names its place.
	os.WriteFile(conf, []byte("leave-running\nno-such-option 1\n"), 0o644)
	code, out := ferry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--config", conf, "--no-default-config")
	if code != 1 || !strings.Contains(out, conf+":2") || !strings.Contains(out, "no-such-option") {
		t.Fatalf("unknown option: exit %d\n%s", code, out)
	}
	checkContinued(t, before, w.Report(t))
}

func TestActionScripts(t *testing.T) {
	// Every stage runs the scripts in order with criu's environment; a
	// failing post-dump script fails the dump and the process runs on.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "4")
	defer w.Kill()
	dir := t.TempDir()
	log := filepath.Join(dir, "stages")
	script := filepath.Join(dir, "hook.sh")
	os.WriteFile(script, []byte("#!/bin/sh\necho \"$CRTOOLS_SCRIPT_ACTION ${CRTOOLS_INIT_PID:-0} $CRTOOLS_IMAGE_DIR\" >> "+log+"\n"+
		"[ \"$CRTOOLS_SCRIPT_ACTION\" != \"$FAIL_AT\" ]\n"), 0o755)
	img := t.TempDir()
	before := w.Report(t)

	t.Setenv("FAIL_AT", "post-dump")
	if code, out := ferry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--action-script", script); code != 1 || !strings.Contains(out, "post-dump") {
		t.Fatalf("failing post-dump script: exit %d\n%s", code, out)
	}
	checkContinued(t, before, w.Report(t))
	os.Remove(log)

	t.Setenv("FAIL_AT", "")
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--action-script", script)
	w.Reap(t)
	mustFerry(t, "restore", "-D", img, "-d", "--action-script", script)
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()
	pid := strconv.Itoa(w.Pid)
	want := "pre-dump 0 " + img + "\npost-dump 0 " + img + "\npre-restore 0 " + img + "\n" +
		"setup-namespaces " + pid + " " + img + "\npost-setup-namespaces " + pid + " " + img + "\n" +
		"post-restore " + pid + " " + img + "\npre-resume " + pid + " " + img + "\npost-resume " + pid + " " + img + "\n"
	if b, _ := os.ReadFile(log); string(b) != want {
		t.Fatalf("stages:\n%s\nwant:\n%s", b, want)
	}
	checkContinued(t, before, r.Report(t))
}
