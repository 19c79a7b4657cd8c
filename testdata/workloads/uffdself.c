/*
 * uffdself: a process that serves its own memory through a userfaultfd
 * (a handler thread), checked across checkpoint/restore.
 *
 * Region M (16 pages) is registered in missing mode: the handler fills a
 * missing page with a pattern of its index and the token (UFFDIO_COPY)
 * and counts it. The first 8 pages are read before the dump.
 * Region W (8 pages) is registered in write-protect mode, written, then
 * its pages 0-3 write-protected: the handler lifts the protection of a
 * page written to, and counts it.
 *
 * SIGUSR1 writes a report (report.h; check=, missing=, wp= faults served).
 * The first SIGUSR2 checks once (check=ok or the reason): M's pages 0-7
 * hold their pattern and read without a fault; reading pages 8-15 faults
 * once each and finds their pattern; writing W's pages faults for 0-3
 * only, and W held what was written; the userfaultfd kept its features.
 *
 *   -r PATH  report path (required)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "report.h"

#define PAGE 4096
#define MPAGES 16
#define WPAGES 8
#define FEATURES UFFD_FEATURE_THREAD_ID

static volatile sig_atomic_t want_report, want_check;
static void on_sig(int sig) { if (sig == SIGUSR1) want_report = 1; else want_check = 1; }

static int uffd;
static char *m, *w;
static uint64_t token;
static atomic_long missing, wp;

static void pattern(uint64_t *page, long i)
{
	for (int k = 0; k < PAGE / 8; k++)
		page[k] = token + i * 1000 + k;
}

static void *handler(void *arg)
{
	(void)arg;
	static uint64_t buf[PAGE / 8];
	for (;;) {
		struct uffd_msg msg;
		if (read(uffd, &msg, sizeof msg) != sizeof msg) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return NULL;
		}
		if (msg.event != UFFD_EVENT_PAGEFAULT)
			continue;
		uint64_t addr = msg.arg.pagefault.address & ~(uint64_t)(PAGE - 1);
		if (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
			/* Counted before the faulting thread wakes. */
			atomic_fetch_add(&wp, 1);
			struct uffdio_writeprotect p = {.range = {.start = addr, .len = PAGE}, .mode = 0};
			ioctl(uffd, UFFDIO_WRITEPROTECT, &p);
			continue;
		}
		pattern(buf, (long)(addr - (uint64_t)m) / PAGE);
		atomic_fetch_add(&missing, 1);
		struct uffdio_copy c = {.dst = addr, .src = (uint64_t)buf, .len = PAGE};
		ioctl(uffd, UFFDIO_COPY, &c);
	}
}

static int has_pattern(long i)
{
	uint64_t want[PAGE / 8];
	pattern(want, i);
	return !memcmp(m + i * PAGE, want, PAGE);
}

static void check(char *res, size_t n)
{
	long before = atomic_load(&missing);
	for (long i = 0; i < 8; i++)
		if (!has_pattern(i)) {
			snprintf(res, n, "M page %ld lost its pattern", i);
			return;
		}
	if (atomic_load(&missing) != before) {
		snprintf(res, n, "M's present pages faulted");
		return;
	}
	for (long i = 8; i < MPAGES; i++) {
		long was = atomic_load(&missing);
		if (!has_pattern(i)) {
			snprintf(res, n, "M page %ld read %llx, not its pattern (served by no handler?)", i,
				 (unsigned long long)*(uint64_t *)(m + i * PAGE));
			return;
		}
		if (atomic_load(&missing) != was + 1) {
			snprintf(res, n, "reading M's missing page %ld faulted %ld times, want once", i, atomic_load(&missing) - was);
			return;
		}
	}
	long wbefore = atomic_load(&wp);
	for (long i = 0; i < WPAGES; i++) {
		if (*(uint64_t *)(w + i * PAGE) != (token ^ (uint64_t)i)) {
			snprintf(res, n, "W page %ld lost its contents", i);
			return;
		}
		*(uint64_t *)(w + i * PAGE) = 0;
	}
	if (atomic_load(&wp) != wbefore + 4) {
		snprintf(res, n, "writing W faulted %ld times, want 4 (its protected pages)", atomic_load(&wp) - wbefore);
		return;
	}
	char path[64], line[256];
	snprintf(path, sizeof path, "/proc/self/fdinfo/%d", uffd);
	FILE *f = fopen(path, "r");
	unsigned long long api = 0, features = 0;
	while (f && fgets(line, sizeof line, f))
		sscanf(line, "API:\t%llx:%llx", &api, &features);
	if (f)
		fclose(f);
	if (!(features & FEATURES)) {
		snprintf(res, n, "the userfaultfd's features are %#llx", features);
		return;
	}
	snprintf(res, n, "ok");
}

int main(int argc, char **argv)
{
	const char *rp = report_start(argc, argv, &token);
	if (!rp)
		return 2;
	signal(SIGUSR1, on_sig);
	signal(SIGUSR2, on_sig);
	uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
	struct uffdio_api api = {.api = UFFD_API, .features = FEATURES};
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api))
		return 1;
	m = mmap(NULL, MPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	w = mmap(NULL, WPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED || w == MAP_FAILED)
		return 1;
	struct uffdio_register rm = {.range = {.start = (uint64_t)m, .len = MPAGES * PAGE}, .mode = UFFDIO_REGISTER_MODE_MISSING};
	struct uffdio_register rw = {.range = {.start = (uint64_t)w, .len = WPAGES * PAGE}, .mode = UFFDIO_REGISTER_MODE_WP};
	if (ioctl(uffd, UFFDIO_REGISTER, &rm) || ioctl(uffd, UFFDIO_REGISTER, &rw))
		return 1;
	pthread_t th;
	if (pthread_create(&th, NULL, handler, NULL))
		return 1;
	char res[256] = "unchecked", fail[256] = "";
	for (long i = 0; i < 8; i++)
		if (!has_pattern(i))
			snprintf(fail, sizeof fail, "M page %ld was not served", i);
	for (long i = 0; i < WPAGES; i++)
		*(uint64_t *)(w + i * PAGE) = token ^ (uint64_t)i;
	struct uffdio_writeprotect p = {.range = {.start = (uint64_t)w, .len = 4 * PAGE}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
	if (ioctl(uffd, UFFDIO_WRITEPROTECT, &p))
		snprintf(fail, sizeof fail, "UFFDIO_WRITEPROTECT: %s", strerror(errno));
	long seq = 0, counter = 0;
	int checked = 0;
	want_report = 1;
	for (;; counter++) {
		if (want_check && !checked) {
			checked = 1;
			check(res, sizeof res);
		}
		if (want_report) {
			want_report = 0;
			report_write(rp, fail, token, counter, ++seq, "check=%s\nmissing=%ld\nwp=%ld\n", res,
				     atomic_load(&missing), atomic_load(&wp));
		}
		usleep(10000);
	}
}
