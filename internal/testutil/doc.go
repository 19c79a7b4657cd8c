// Package testutil builds and drives the self-verifying workloads of
// testdata/workloads for ferry's tests.
//
// A workload reports on SIGUSR1 by writing key=value lines to its report
// file (see memcheck.c). Everything here works by PID and report file, so
// the same Workload value keeps working after the process was dumped and
// restored (when it is no longer the test's child). Every process a test
// starts is killed by PID in t.Cleanup; never by name.
package testutil
