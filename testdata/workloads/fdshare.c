/*
 * fdshare: a child that shares its parent's fd table (CLONE_FILES) and
 * filesystem information (CLONE_FS), checked across checkpoint/restore.
 *
 * On each request (a byte through a pipe) the child opens /dev/null and
 * changes directory, alternately to the report's directory and to "/",
 * and answers with the fd number it got. On SIGUSR1 the parent makes a
 * request and checks that the child's new fd is open in its own table and
 * that its own working directory moved with the child's; then it writes a
 * report (key=value lines, renamed into place; pids= names the children).
 *
 * Two more children share an fd table with each other but not with the
 * parent: S1, cloned plainly, clones S2 as its sibling (CLONE_PARENT |
 * CLONE_FILES). On each report S2 opens /dev/null and S1 checks that the
 * fd is open in its own table.
 *
 *   -r PATH  report path (required)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "report.h"

static volatile sig_atomic_t want_report;
static void on_usr1(int sig) { (void)sig; want_report = 1; }

static int req[2], ans[2], q1[2], a1[2], q2[2], a2[2];
static char stack[3][1 << 16];
static char dir[PATH_MAX];

static int child(void *arg)
{
	(void)arg;
	for (int n = 0;; n++) {
		char c;
		if (read(req[0], &c, 1) != 1)
			_exit(1);
		int fd = open("/dev/null", O_RDONLY);
		if (chdir(n % 2 ? "/" : dir))
			fd = -1;
		if (write(ans[1], &fd, sizeof fd) != sizeof fd)
			_exit(1);
	}
}

/* s2 opens /dev/null on each request and answers with the fd. */
static int s2_main(void *arg)
{
	(void)arg;
	for (;;) {
		char c;
		if (read(q2[0], &c, 1) != 1)
			_exit(1);
		int fd = open("/dev/null", O_RDONLY);
		if (write(a2[1], &fd, sizeof fd) != sizeof fd)
			_exit(1);
	}
}

/* s1 clones s2 into its fd table, then answers whether an fd is open. */
static int s1_main(void *arg)
{
	(void)arg;
	int s2 = clone(s2_main, stack[2] + sizeof stack[2], CLONE_PARENT | CLONE_FILES, NULL);
	if (write(a1[1], &s2, sizeof s2) != sizeof s2)
		_exit(1);
	for (;;) {
		int fd;
		if (read(q1[0], &fd, sizeof fd) != sizeof fd)
			_exit(1);
		int open_here = fcntl(fd, F_GETFD) >= 0;
		close(fd);
		if (write(a1[1], &open_here, sizeof open_here) != sizeof open_here)
			_exit(1);
	}
}

int main(int argc, char **argv)
{
	uint64_t token;
	const char *rp = report_start(argc, argv, &token);
	if (!rp)
		return 2;
	snprintf(dir, sizeof dir, "%s", rp);
	*strrchr(dir, '/') = 0;
	signal(SIGUSR1, on_usr1);
	if (pipe(req) || pipe(ans) || pipe(q1) || pipe(a1) || pipe(q2) || pipe(a2))
		return 1;
	int pid = clone(child, stack[0] + sizeof stack[0], CLONE_FILES | CLONE_FS | SIGCHLD, NULL);
	int s1 = clone(s1_main, stack[1] + sizeof stack[1], SIGCHLD, NULL);
	int s2 = -1;
	if (pid < 0 || s1 < 0 || read(a1[0], &s2, sizeof s2) != sizeof s2 || s2 < 0)
		return 1;
	long seq = 0, counter = 0, n = 0;
	want_report = 1;
	for (;; counter++) {
		if (want_report) {
			want_report = 0;
			char fail[256] = "", cwd[PATH_MAX], c = '?';
			int fd = -1;
			if (write(req[1], &c, 1) != 1 || read(ans[0], &fd, sizeof fd) != sizeof fd || fd < 0)
				snprintf(fail, sizeof fail, "the child did not answer");
			else if (fcntl(fd, F_GETFD) < 0)
				snprintf(fail, sizeof fail, "the child's fd %d is not in the parent's table", fd);
			else if (!getcwd(cwd, sizeof cwd) || strcmp(cwd, n % 2 ? "/" : dir))
				snprintf(fail, sizeof fail, "the parent's cwd is %s after the child's chdir", cwd);
			if (fd >= 0)
				close(fd);
			n++;
			int fd2 = -1, open_there = 0;
			if (!fail[0] && (write(q2[1], &c, 1) != 1 || read(a2[0], &fd2, sizeof fd2) != sizeof fd2 || fd2 < 0 ||
					 write(q1[1], &fd2, sizeof fd2) != sizeof fd2 ||
					 read(a1[0], &open_there, sizeof open_there) != sizeof open_there))
				snprintf(fail, sizeof fail, "the siblings did not answer");
			else if (!fail[0] && !open_there)
				snprintf(fail, sizeof fail, "S2's fd %d is not in S1's table", fd2);
			report_write(rp, fail, token, counter, ++seq, "pids=%d,%d,%d\n", pid, s1, s2);
		}
		usleep(10000);
	}
}
