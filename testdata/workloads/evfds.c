/*
 * evfds: event file descriptors that verify themselves across
 * checkpoint/restore: a nonblocking signalfd reading SIGUSR2 (blocked), a
 * periodic timerfd (every 50 ms) and a one-shot timerfd due in 600 s. On
 * SIGUSR1 it checks them (a SIGUSR2 it raises arrives through the
 * signalfd; the periodic timer keeps expiring; the one-shot one is still
 * armed, due within 600 s and not much sooner than it would have been)
 * and writes a report (key=value lines, renamed into place).
 *
 *   -r PATH  report path (required)
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "report.h"

static volatile sig_atomic_t want_report;
static void on_usr1(int sig) { (void)sig; want_report = 1; }

int main(int argc, char **argv)
{
	uint64_t token;
	const char *rp = report_start(argc, argv, &token);
	if (!rp)
		return 2;
	signal(SIGUSR1, on_usr1);
	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGUSR2);
	sigprocmask(SIG_BLOCK, &m, NULL);
	int sfd = signalfd(-1, &m, SFD_NONBLOCK | SFD_CLOEXEC);
	int tick = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
	int once = timerfd_create(CLOCK_MONOTONIC, 0);
	struct itimerspec every = {{0, 50000000}, {0, 50000000}}, later = {{0, 0}, {600, 0}};
	if (sfd < 0 || tick < 0 || once < 0 || timerfd_settime(tick, 0, &every, NULL) || timerfd_settime(once, 0, &later, NULL))
		return 1;
	struct timespec start;
	clock_gettime(CLOCK_MONOTONIC, &start);
	long seq = 0, ticks = 0;
	want_report = 1;
	for (;;) {
		uint64_t n;
		if (read(tick, &n, sizeof n) == sizeof n)
			ticks += n;
		if (want_report) {
			want_report = 0;
			char fail[128] = "";
			raise(SIGUSR2);
			struct signalfd_siginfo si;
			if (read(sfd, &si, sizeof si) != sizeof si || si.ssi_signo != SIGUSR2)
				snprintf(fail, sizeof fail, "no SIGUSR2 through the signalfd");
			struct itimerspec cur;
			struct timespec now;
			clock_gettime(CLOCK_MONOTONIC, &now);
			long left_should = 600 - (now.tv_sec - start.tv_sec);
			if (timerfd_gettime(once, &cur) || cur.it_value.tv_sec > 600 || cur.it_value.tv_sec < left_should - 30)
				snprintf(fail, sizeof fail, "one-shot timer: %ld s left, about %ld expected", (long)cur.it_value.tv_sec, left_should);
			if (timerfd_gettime(tick, &cur) || cur.it_interval.tv_nsec != 50000000)
				snprintf(fail, sizeof fail, "periodic timer interval");
			report_write(rp, fail, token, ticks, ++seq, "");
		}
		usleep(10000);
	}
}
