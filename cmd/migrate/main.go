// Command migrate moves a running process from one host to another:
//
//	migrate --from hostA --to hostB PID
//
// It drives the ferry agents of both hosts (see "migrate --help"); "ferry
// migrate" is the same command.
package main

import "github.com/ferrycr/ferry/internal/migratecmd"

func main() { migratecmd.Main() }
