/*
 * ptycheck: a pseudo-terminal pair that verifies itself across
 * checkpoint/restore.
 *
 * It draws a random token kept only in memory, opens a pty pair (master
 * from /dev/ptmx, slave /dev/pts/N), makes the slave its controlling
 * terminal (it must be started as a session leader), and sets on it a
 * termios (raw-ish: no echo, no canonical mode, 38400 baud, VMIN 0) and a
 * window size of 33x111. A second pair stays without a controlling role,
 * in packet mode on its master. On SIGUSR1 it checks everything (same
 * index and slave name, same settings, the controlling terminal, and that
 * bytes flow both ways through both pairs) and writes a report (key=value
 * lines, renamed into place).
 *
 *   -r PATH  report path (required)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <termios.h>
#include <unistd.h>

static volatile sig_atomic_t want_report;
static void on_usr1(int sig) { (void)sig; want_report = 1; }

static uint64_t token;
static int m1, s1, m2, s2, n1, n2;
static char fail[256];

static int ptn(int m)
{
	int n = -1;
	ioctl(m, TIOCGPTN, &n);
	return n;
}

static void must(int ok, const char *what)
{
	if (!ok && !fail[0])
		snprintf(fail, sizeof fail, "%s", what);
}

/* flows sends a line from a to b and reads it back (b may be a packet-mode
 * master: its reads start with a status byte). */
static int flows(int a, int b, int packet)
{
	char msg[32], buf[64];
	int n = snprintf(msg, sizeof msg, "%08x\n", (unsigned)token);
	if (write(a, msg, n) != n)
		return 0;
	usleep(20000);
	ssize_t got = read(b, buf, sizeof buf);
	if (packet) {
		if (got < 1 || buf[0] != 0)
			return 0;
		memmove(buf, buf + 1, --got);
	}
	return got >= n - 1 && memcmp(buf, msg, n - 1) == 0;
}

static void check(void)
{
	struct termios t;
	struct winsize w;
	must(ptn(m1) == n1 && ptn(m2) == n2, "pty index changed");
	char path[64];
	snprintf(path, sizeof path, "/dev/pts/%d", n1);
	char link[64] = "";
	char fdp[64];
	snprintf(fdp, sizeof fdp, "/proc/self/fd/%d", s1);
	ssize_t l = readlink(fdp, link, sizeof link - 1);
	if (l > 0)
		link[l] = 0;
	must(strcmp(link, path) == 0, "slave path changed");
	must(tcgetattr(s1, &t) == 0 && !(t.c_lflag & (ECHO | ICANON)) && cfgetospeed(&t) == B38400 && t.c_cc[VMIN] == 0,
	     "termios");
	must(ioctl(s1, TIOCGWINSZ, &w) == 0 && w.ws_row == 33 && w.ws_col == 111, "window size");
	int pkt = 0;
	must(ioctl(m2, TIOCGPKT, &pkt) == 0 && pkt == 1, "packet mode");
	pid_t sid = -1;
	must(ioctl(s1, TIOCGSID, &sid) == 0 && sid == getsid(0), "not the controlling terminal");
	must(tcgetpgrp(s1) == getpgrp(), "foreground process group");
	must(flows(m1, s1, 0), "master to slave");
	must(flows(s1, m1, 0), "slave to master");
	must(flows(s2, m2, 1), "second pair, slave to packet-mode master");
}

static int open_pair(int *m, int *s, int *n, int ctty)
{
	*m = posix_openpt(O_RDWR | O_NOCTTY);
	if (*m < 0 || grantpt(*m) || unlockpt(*m))
		return -1;
	*n = ptn(*m);
	*s = open(ptsname(*m), O_RDWR | (ctty ? 0 : O_NOCTTY));
	return *s < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
	const char *rp = NULL;
	for (int o; (o = getopt(argc, argv, "r:")) != -1;)
		if (o == 'r')
			rp = optarg;
	if (!rp || getrandom(&token, sizeof token, 0) != sizeof token)
		return 2;
	signal(SIGUSR1, on_usr1);
	signal(SIGTTOU, SIG_IGN);
	if (open_pair(&m1, &s1, &n1, 1) || open_pair(&m2, &s2, &n2, 0)) {
		perror("pty");
		return 1;
	}
	if (ioctl(s1, TIOCSCTTY, 0) < 0)
		perror("TIOCSCTTY");
	struct termios t;
	tcgetattr(s1, &t);
	t.c_lflag &= ~(ECHO | ICANON);
	t.c_cc[VMIN] = 0;
	t.c_cc[VTIME] = 1;
	cfsetspeed(&t, B38400);
	tcsetattr(s1, TCSANOW, &t);
	struct winsize w = {.ws_row = 33, .ws_col = 111};
	ioctl(s1, TIOCSWINSZ, &w);
	int one = 1;
	ioctl(m2, TIOCPKT, &one);
	tcgetattr(s2, &t);
	t.c_lflag &= ~(ECHO | ICANON);
	t.c_cc[VMIN] = 0;
	t.c_cc[VTIME] = 1;
	tcsetattr(s2, TCSANOW, &t);
	long seq = 0;
	want_report = 1;
	for (;;) {
		if (want_report) {
			want_report = 0;
			fail[0] = 0;
			check();
			char tmp[4096];
			snprintf(tmp, sizeof tmp, "%s.tmp", rp);
			FILE *f = fopen(tmp, "w");
			if (f) {
				fprintf(f, "status=%s\n", fail[0] ? "fail" : "ok");
				if (fail[0])
					fprintf(f, "reason=%s\n", fail);
				fprintf(f, "pid=%d\ntoken=%016llx\ncounter=%ld\npty=%d\nseq=%ld\n", getpid(),
					(unsigned long long)token, seq, n1, seq + 1);
				seq++;
				fclose(f);
				rename(tmp, rp);
			}
		}
		usleep(10000);
	}
}
