// Package proc parses the /proc files ferry reads about a task: maps and
// smaps, stat, status, limits, fdinfo, auxv, timers and the task list.
//
// Parsers take the file contents (so they are unit-testable and fuzzable)
// and have thin wrappers that read /proc/PID/... . Every error names the
// file it came from.
package proc
