// Package treeplan decides how a restore makes a process tree again:
// which process clones which, when sessions and process groups are made,
// and which short-lived helper processes stand in for dead session and
// group leaders. The dump runs the same plan to refuse, before anything
// is written, a tree the restore could not make.
//
// Kernel rules the plan follows:
//
//   - a child starts in its creator's session and group; CLONE_PARENT
//     gives it the creator's parent instead (and the creator's exit
//     signal), so a process can be born in a sibling's session;
//   - setsid makes a new session and group, and only a process that leads
//     no group can call it: a session is made by a fresh child;
//   - setpgid joins a group of the same session (or makes one led by the
//     caller);
//   - sessions and groups outlive their leaders.
//
// So a process in the session its parent left is made before its
// parent's setsid, and a session or group whose leader is dead is made
// by a helper with the leader's PID that exits once the tree is built
// (its parent reaps it). Every process keeps its real parent.
package treeplan
