// Package cgroups reads and makes the control groups of processes, on
// cgroup v1 hierarchies and the v2 unified one: which cgroup a process is
// in (/proc/PID/cgroup), where each hierarchy is mounted here
// (/proc/self/mountinfo), the properties ferry saves and sets again, and
// moving a process into a cgroup (cgroup.procs).
package cgroups
