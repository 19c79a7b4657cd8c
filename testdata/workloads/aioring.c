/*
 * aioring: an AIO context (io_setup) with completed events, some reaped
 * and some not, across checkpoint/restore. On SIGUSR1 it checks that the
 * ring still has the head and tail it had after setup, then (once)
 * reaps what waits, submits a write and reaps its completion through the
 * same context (the kernel's own tail must match the ring's), and writes
 * a report (key=value lines, renamed into place).
 *
 *   -r PATH  report path (required)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "report.h"

struct ring {
	unsigned id, nr, head, tail;
};

static volatile sig_atomic_t want_report, want_check;
static void on_usr1(int sig) { (void)sig; want_report = 1; }
static void on_usr2(int sig) { (void)sig; want_check = 1; }

int main(int argc, char **argv)
{
	uint64_t token;
	const char *rp = report_start(argc, argv, &token);
	if (!rp)
		return 2;
	signal(SIGUSR1, on_usr1);
	signal(SIGUSR2, on_usr2);
	aio_context_t ctx = 0;
	if (syscall(__NR_io_setup, 16, &ctx) < 0)
		return 1;
	int fd = open("/dev/null", O_WRONLY);
	char byte = 'x';
	struct iocb cb = {.aio_lio_opcode = IOCB_CMD_PWRITE, .aio_fildes = fd, .aio_buf = (uintptr_t)&byte, .aio_nbytes = 1, .aio_data = 7};
	struct iocb *cbp = &cb;
	struct io_event ev[64];
	for (int i = 0; i < 5; i++) /* 5 completions, 2 reaped: 3 wait */
		if (syscall(__NR_io_submit, ctx, 1, &cbp) != 1)
			return 1;
	if (syscall(__NR_io_getevents, ctx, 2, 2, ev, NULL) != 2)
		return 1;
	volatile struct ring *r = (struct ring *)ctx;
	unsigned head0 = r->head, tail0 = r->tail;
	long seq = 0, counter = 0;
	int checked = 0;
	char fail[256] = "";
	want_report = 1;
	for (;; counter++) {
		if (want_check && !checked) {
			checked = 1;
			{
				if (r->head != head0 || r->tail != tail0)
					snprintf(fail, sizeof fail, "ring head %u tail %u, were %u %u", r->head, r->tail, head0, tail0);
				else if (syscall(__NR_io_getevents, ctx, 3, 3, ev, NULL) != 3 || ev[0].data != 7)
					snprintf(fail, sizeof fail, "the 3 waiting completions are gone");
				else if (syscall(__NR_io_submit, ctx, 1, &cbp) != 1 || syscall(__NR_io_getevents, ctx, 1, 1, ev, NULL) != 1 || ev[0].res != 1)
					snprintf(fail, sizeof fail, "a new write did not complete through the context");
			}
		}
		if (want_report) {
			want_report = 0;
			report_write(rp, fail, token, counter, ++seq, "checked=%d\n", checked);
		}
		usleep(10000);
	}
}
