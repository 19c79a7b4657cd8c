/*
 * fdshare: a child that shares its parent's fd table (CLONE_FILES) and
 * filesystem information (CLONE_FS), checked across checkpoint/restore.
 *
 * On each request (a byte through a pipe) the child opens /dev/null and
 * changes directory, alternately to the report's directory and to "/",
 * and answers with the fd number it got. On SIGUSR1 the parent makes a
 * request and checks that the child's new fd is open in its own table and
 * that its own working directory moved with the child's; then it writes a
 * report (key=value lines, renamed into place; pids= names the child).
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

static int req[2], ans[2];
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

int main(int argc, char **argv)
{
	uint64_t token;
	const char *rp = report_start(argc, argv, &token);
	if (!rp)
		return 2;
	snprintf(dir, sizeof dir, "%s", rp);
	*strrchr(dir, '/') = 0;
	signal(SIGUSR1, on_usr1);
	if (pipe(req) || pipe(ans))
		return 1;
	static char stack[1 << 16];
	int pid = clone(child, stack + sizeof stack, CLONE_FILES | CLONE_FS | SIGCHLD, NULL);
	if (pid < 0)
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
			report_write(rp, fail, token, counter, ++seq, "pids=%d\n", pid);
		}
		usleep(10000);
	}
}
