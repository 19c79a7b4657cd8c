/*
 * memcheck: a workload that verifies itself across checkpoint/restore.
 *
 * It draws a random token at start and keeps it only in memory, fills
 * -m MiB with a pattern derived from the token, keeps counters in every
 * thread, and on SIGUSR1 verifies everything and writes a report
 * (key=value lines, atomically renamed into place). A process that was
 * re-run instead of restored has a different token and counters that
 * start again from zero: tests compare both.
 *
 *   -m MIB   memory to fill (default 16)
 *   -t N     worker threads with their own counters and TLS
 *   -p       a thread blocked in read() on a pipe; SIGUSR2 makes the main
 *            loop write one byte into it
 *   -n       a thread looping in nanosleep(50 ms)
 *   -s       live SSE/AVX register values across the dump, checked each loop
 *   -f FILE  numbered lines written to FILE (no O_APPEND), offset checked
 *   -x CODE  exit with CODE on SIGINT
 *   -M       extra mappings: shared anonymous, a private file mapping
 *            with copy-on-write pages, read-only and PROT_NONE pages
 *            holding data
 *   -g DIR   a file in DIR, written, kept open and unlinked (a ghost)
 *   -G KIB   size of that file (default 64)
 *   -W       on SIGUSR2, rewrite pages 100-109 of the -m buffer with the
 *            same pattern (writes that change nothing: a dirty tracker
 *            must still see them)
 *   -Z       on SIGUSR2, drop pages 200-209 of the -m buffer with
 *            madvise(MADV_DONTNEED): from then on they must read as zero
 *   -V       on SIGUSR2, move the upper half of the -m buffer elsewhere with
 *            mremap and unmap 1 MiB of the lower half; from then on the
 *            moved pages are checked at their new address and the unmapped
 *            ones are not checked (memory being served lazily must follow)
 *   -K       on SIGUSR2, fork a child that verifies all memory, writes
 *            "child=ok" or "child=fail: reason" to REPORT_PATH.child and
 *            exits (copy-on-write memory must hold what the parent had)
 *   -C       churn: a second buffer of -m MiB is rewritten page by page in
 *            passes; every page holds the pass number it was last written
 *            in, and at the end of each pass all must hold the same one.
 *            A snapshot taken at one instant passes this check after a
 *            restore; one mixing pages of different instants fails it.
 *   -c MIBS  with -C, rewrite at most MIBS MiB per second, over a 64 MiB
 *            churn buffer (without -c: as fast as it can, over -m MiB)
 *   -T       timers and signals: ITIMER_REAL, a POSIX timer (and with -t one
 *            that signals worker 0 alone, SIGEV_THREAD_ID), a blocked
 *            real-time signal queued twice with values, a sigaltstack, and
 *            (with -t) SIGURG sent by tgkill to worker 0, which blocks it
 *            (a thread-directed signal whose siginfo says SI_TKILL)
 *   -r PATH  report path (required)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <immintrin.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define MAXT 64

static volatile sig_atomic_t want_report, want_pipe, want_exit;
static uint64_t token;
static unsigned char *mem;
static size_t mem_size;
static char *report_path;
static int exit_code = -1;

static volatile long counters[MAXT];
static __thread long tls_counter;
static __thread long tls_id;
static volatile int thread_fail;
static char thread_fail_reason[128];

static int pipefd[2] = {-1, -1};
static volatile long piperead;
static volatile long wakeups;
static int nthreads, use_pipe, use_sleep, use_simd;

static int out_fd = -1;
static long lines;
static off_t out_off;

static char fail_reason[256];

/* -C */
static uint64_t *churn;
static size_t churn_pages, churn_next;
static uint64_t churn_gen = 1, churn_passes;
static int churn_fail;
static long churn_rate; /* -c: MiB/s, 0 = unlimited */
static uint64_t churn_written;
static struct timespec churn_start;

static double since(const struct timespec *t0)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (t.tv_sec - t0->tv_sec) + (t.tv_nsec - t0->tv_nsec) / 1e9;
}

/* churn_step rewrites a few pages; at the end of a pass it checks them all. */
static void churn_step(void)
{
	if (churn_rate) {
		if (churn_written * 4096.0 > churn_rate * 1048576.0 * since(&churn_start)) {
			usleep(1000);
			return;
		}
	}
	for (int k = 0; k < 64; k++) {
		churn_written++;
		uint64_t *pg = churn + churn_next * (4096 / 8);
		for (int w = 0; w < 4096 / 8; w += 64)
			pg[w] = churn_gen ^ token;
		if (++churn_next < churn_pages)
			continue;
		for (size_t i = 0; i < churn_pages; i++) {
			uint64_t *q = churn + i * (4096 / 8);
			for (int w = 0; w < 4096 / 8; w += 64)
				if (q[w] != (churn_gen ^ token) && !churn_fail) {
					churn_fail = 1;
					snprintf(fail_reason, sizeof fail_reason,
						 "churn page %zu holds pass %llu, pass %llu just ended", i,
						 (unsigned long long)(q[w] ^ token), (unsigned long long)churn_gen);
				}
		}
		churn_next = 0;
		churn_gen++;
		churn_passes++;
		return;
	}
}

static uint64_t xorshift(uint64_t *s);

/* -M */
static unsigned char *shared_anon, *cow_map, *ro_map, *none_map;
static size_t cow_len;
/* -g */
static int ghost_fd = -1;
static long ghost_kib = 64;
/* -T */
static volatile long alarms, ticks, rtsigs, rtsum, tticks, tmisses;
static timer_t posix_timer, thread_timer;
static volatile pid_t worker0_tid;
static char altstack[64 * 1024];

static void on_timer(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (sig == SIGALRM)
		alarms++;
	else if (sig == SIGRTMIN + 1)
		ticks++;
	else if (sig == SIGRTMIN + 2) {
		if (gettid() == worker0_tid)
			tticks++;
		else
			tmisses++;
	}
	else if (sig == SIGRTMIN) {
		rtsigs++;
		rtsum += si->si_value.sival_int;
	}
}

static int setup_maps(const char *self)
{
	shared_anon = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	ro_map = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	none_map = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int fd = open(self, O_RDONLY);
	if (fd < 0 || shared_anon == MAP_FAILED || ro_map == MAP_FAILED || none_map == MAP_FAILED)
		return -1;
	cow_len = 4 * PAGE;
	cow_map = mmap(NULL, cow_len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	close(fd);
	if (cow_map == MAP_FAILED)
		return -1;
	uint64_t s = token ^ 0x5151;
	for (size_t i = 0; i < (1 << 20) / 8; i++)
		((uint64_t *)shared_anon)[i] = xorshift(&s);
	/* Pages 1 and 3 of the file mapping become copy-on-write copies. */
	memset(cow_map + PAGE, 0xa5, 16);
	memcpy(cow_map + 3 * PAGE, &token, sizeof token);
	memcpy(ro_map, &token, sizeof token);
	memcpy(none_map + PAGE, &token, sizeof token);
	if (mprotect(ro_map, 2 * PAGE, PROT_READ) || mprotect(none_map, 2 * PAGE, PROT_NONE))
		return -1;
	return 0;
}

static int check_maps(void)
{
	uint64_t s = token ^ 0x5151;
	for (size_t i = 0; i < (1 << 20) / 8; i++)
		if (((uint64_t *)shared_anon)[i] != xorshift(&s)) {
			snprintf(fail_reason, sizeof fail_reason, "shared anonymous mapping differs at word %zu", i);
			return 0;
		}
	unsigned char want[16];
	memset(want, 0xa5, 16);
	if (memcmp(cow_map + PAGE, want, 16) || memcmp(cow_map + 3 * PAGE, &token, sizeof token) ||
	    memcmp(cow_map, "\x7f" "ELF", 4)) {
		snprintf(fail_reason, sizeof fail_reason, "private file mapping differs");
		return 0;
	}
	if (memcmp(ro_map, &token, sizeof token)) {
		snprintf(fail_reason, sizeof fail_reason, "read-only mapping differs");
		return 0;
	}
	/* Reading PROT_NONE memory would fault: open it up, check, close. */
	mprotect(none_map, 2 * PAGE, PROT_READ);
	int ok = !memcmp(none_map + PAGE, &token, sizeof token);
	mprotect(none_map, 2 * PAGE, PROT_NONE);
	if (!ok)
		snprintf(fail_reason, sizeof fail_reason, "PROT_NONE mapping differs");
	return ok;
}

static int setup_ghost(const char *dir)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/ghost-XXXXXX", dir);
	ghost_fd = mkstemp(path);
	if (ghost_fd < 0)
		return -1;
	uint64_t s = token ^ 0x6767;
	for (long i = 0; i < ghost_kib * 1024 / 8; i++) {
		uint64_t v = xorshift(&s);
		if (write(ghost_fd, &v, 8) != 8)
			return -1;
	}
	lseek(ghost_fd, 12345, SEEK_SET);
	return unlink(path);
}

static int check_ghost(void)
{
	if (lseek(ghost_fd, 0, SEEK_CUR) != 12345) {
		snprintf(fail_reason, sizeof fail_reason, "deleted file offset moved");
		return 0;
	}
	uint64_t s = token ^ 0x6767, v;
	for (long i = 0; i < ghost_kib * 1024 / 8; i++)
		if (pread(ghost_fd, &v, 8, i * 8) != 8 || v != xorshift(&s)) {
			snprintf(fail_reason, sizeof fail_reason, "deleted file contents differ at %ld", i * 8);
			return 0;
		}
	return 1;
}

static int setup_timers(void)
{
	stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
	struct sigaction sa = {0};
	sa.sa_sigaction = on_timer;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if (sigaltstack(&ss, NULL) || sigaction(SIGALRM, &sa, NULL) || sigaction(SIGRTMIN, &sa, NULL) ||
	    sigaction(SIGRTMIN + 1, &sa, NULL) || sigaction(SIGRTMIN + 2, &sa, NULL))
		return -1;
	struct itimerval it = {{0, 20000}, {0, 20000}};
	setitimer(ITIMER_REAL, &it, NULL);
	struct sigevent sev = {0};
	sev.sigev_notify = SIGEV_SIGNAL;
	sev.sigev_signo = SIGRTMIN + 1;
	if (timer_create(CLOCK_MONOTONIC, &sev, &posix_timer))
		return -1;
	struct itimerspec its = {{0, 10000000}, {0, 10000000}};
	timer_settime(posix_timer, 0, &its, NULL);
	/* Two queued instances of a blocked RT signal, with their values:
	 * pending across the dump, delivered on SIGUSR2 after restore. */
	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGRTMIN);
	sigprocmask(SIG_BLOCK, &m, NULL);
	union sigval v1 = {.sival_int = 1000}, v2 = {.sival_int = 234};
	sigqueue(getpid(), SIGRTMIN, v1);
	sigqueue(getpid(), SIGRTMIN, v2);
	return 0;
}

static int check_timers(void)
{
	stack_t cur;
	sigaltstack(NULL, &cur);
	if (cur.ss_sp != altstack || cur.ss_size != sizeof altstack) {
		snprintf(fail_reason, sizeof fail_reason, "sigaltstack lost");
		return 0;
	}
	return 1;
}

static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

/* Page kinds: every 7th page untouched (zero, never written), every 11th
 * page written with zeros, the rest patterned. */
static int page_kind(size_t page)
{
	if (page % 7 == 3)
		return 0;
	if (page % 11 == 5)
		return 1;
	return 2;
}

static void fill_page(size_t page)
{
	uint64_t *p = (uint64_t *)(mem + page * PAGE);
	uint64_t s = token ^ (page * 0x9e3779b97f4a7c15ULL) ^ 1;
	for (size_t i = 0; i < PAGE / 8; i++)
		p[i] = xorshift(&s);
}

static int zapped; /* -Z: pages 200-209 were dropped */

/* -V: after the move, pages from moved_from on live at moved_to; pages
 * [hole_from, hole_to) are unmapped. */
static unsigned char *moved_to;
static size_t moved_from, hole_from, hole_to;

static unsigned char *page_addr(size_t page)
{
	if (moved_to && page >= moved_from)
		return moved_to + (page - moved_from) * PAGE;
	if (page >= hole_from && page < hole_to)
		return NULL;
	return mem + page * PAGE;
}

static int check_page(size_t page)
{
	const uint64_t *p = (const uint64_t *)page_addr(page);
	if (!p)
		return 1;
	if (page_kind(page) != 2 || (zapped && page >= 200 && page < 210)) {
		for (size_t i = 0; i < PAGE / 8; i++)
			if (p[i])
				return 0;
		return 1;
	}
	uint64_t s = token ^ (page * 0x9e3779b97f4a7c15ULL) ^ 1;
	for (size_t i = 0; i < PAGE / 8; i++)
		if (p[i] != xorshift(&s))
			return 0;
	return 1;
}

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		want_report = 1;
	else if (sig == SIGUSR2)
		want_pipe = 1;
	else if (sig == SIGINT)
		want_exit = 1;
	else if (sig == SIGTERM)
		_exit(0);
}

static volatile int urg_pending = -1; /* -T: worker 0 sees its SIGURG pending */
static int timers_wanted;

static void *worker(void *arg)
{
	long id = (long)arg;
	volatile uint64_t canary[8];
	if (id == 0 && timers_wanted) {
		sigset_t m;
		sigemptyset(&m);
		sigaddset(&m, SIGURG);
		pthread_sigmask(SIG_BLOCK, &m, NULL);
		worker0_tid = gettid();
	}
	for (int i = 0; i < 8; i++)
		canary[i] = token ^ (uint64_t)(id * 8 + i);
	tls_id = id;
	for (;;) {
		if (id == 0 && timers_wanted) {
			sigset_t p;
			sigpending(&p);
			urg_pending = sigismember(&p, SIGURG);
		}
		tls_counter++;
		counters[id] = tls_counter;
		if (tls_id != id || counters[id] != tls_counter) {
			snprintf(thread_fail_reason, sizeof thread_fail_reason, "thread %ld: TLS mismatch", id);
			thread_fail = 1;
		}
		for (int i = 0; i < 8; i++)
			if (canary[i] != (token ^ (uint64_t)(id * 8 + i))) {
				snprintf(thread_fail_reason, sizeof thread_fail_reason, "thread %ld: stack canary", id);
				thread_fail = 1;
			}
		usleep(1000);
	}
	return NULL;
}

static void *pipe_reader(void *arg)
{
	(void)arg;
	char c;
	for (;;) {
		ssize_t n = read(pipefd[0], &c, 1);
		if (n == 1)
			piperead++;
		else if (n < 0 && errno != EINTR) {
			snprintf(thread_fail_reason, sizeof thread_fail_reason, "pipe read: %s", strerror(errno));
			thread_fail = 1;
			return NULL;
		}
	}
	return NULL;
}

static void *sleeper(void *arg)
{
	(void)arg;
	for (;;) {
		struct timespec ts = {0, 50 * 1000 * 1000};
		while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
			;
		wakeups++;
	}
	return NULL;
}

static int maps_on, timers_on, churn_on;

static int verify(void)
{
	if (maps_on && !check_maps())
		return 0;
	if (churn_on && churn_fail)
		return 0;
	if (ghost_fd >= 0 && !check_ghost())
		return 0;
	if (timers_on && !check_timers())
		return 0;
	size_t pages = mem_size / PAGE;
	for (size_t i = 0; i < pages; i++)
		if (!check_page(i)) {
			snprintf(fail_reason, sizeof fail_reason, "memory page %zu differs", i);
			return 0;
		}
	if (thread_fail) {
		snprintf(fail_reason, sizeof fail_reason, "%s", thread_fail_reason);
		return 0;
	}
	if (out_fd >= 0) {
		off_t cur = lseek(out_fd, 0, SEEK_CUR);
		if (cur != out_off) {
			snprintf(fail_reason, sizeof fail_reason, "file offset %lld, expected %lld",
				 (long long)cur, (long long)out_off);
			return 0;
		}
	}
	return 1;
}

static void write_report(long counter, long seq, int ok)
{
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.tmp", report_path);
	FILE *f = fopen(tmp, "w");
	if (!f)
		return;
	fprintf(f, "status=%s\n", ok ? "ok" : "fail");
	if (!ok)
		fprintf(f, "reason=%s\n", fail_reason);
	fprintf(f, "pid=%d\n", getpid());
	fprintf(f, "token=%016llx\n", (unsigned long long)token);
	fprintf(f, "counter=%ld\n", counter);
	for (int i = 0; i < nthreads; i++)
		fprintf(f, "thread%d=%ld\n", i, counters[i]);
	/* Where the thread counters live: tests read them from outside. */
	fprintf(f, "counters_at=%lx\n", (unsigned long)(uintptr_t)counters);
	if (use_sleep)
		fprintf(f, "wakeups=%ld\n", wakeups);
	if (use_pipe)
		fprintf(f, "piperead=%ld\n", piperead);
	if (out_fd >= 0)
		fprintf(f, "lines=%ld\n", lines);
	if (churn_on)
		fprintf(f, "passes=%llu\n", (unsigned long long)churn_passes);
	if (timers_on) {
		sigset_t pend;
		sigpending(&pend);
		fprintf(f, "alarms=%ld\nticks=%ld\nrtsigs=%ld\nrtsum=%ld\nrtpending=%d\n", alarms, ticks, rtsigs, rtsum,
			sigismember(&pend, SIGRTMIN));
		fprintf(f, "urgpending=%d\n", urg_pending);
		fprintf(f, "tticks=%ld\ntmisses=%ld\n", tticks, tmisses);
		fprintf(f, "timerid=%ld\n", (long)(intptr_t)posix_timer);
	}
	fprintf(f, "seq=%ld\n", seq);
	fclose(f);
	rename(tmp, report_path);
}

int main(int argc, char **argv)
{
	long mib = 16;
	const char *outfile = NULL;
	int opt;
	const char *ghost_dir = NULL;
	int use_maps = 0, use_timers = 0, use_rewrite = 0, use_zap = 0, use_move = 0, use_churn = 0, use_fork = 0;
	while ((opt = getopt(argc, argv, "m:t:pnsf:x:r:Mg:G:TWZVCc:K")) != -1) {
		switch (opt) {
		case 'm': mib = atol(optarg); break;
		case 't': nthreads = atoi(optarg); break;
		case 'p': use_pipe = 1; break;
		case 'n': use_sleep = 1; break;
		case 's': use_simd = 1; break;
		case 'f': outfile = optarg; break;
		case 'x': exit_code = atoi(optarg); break;
		case 'r': report_path = optarg; break;
		case 'M': use_maps = 1; break;
		case 'g': ghost_dir = optarg; break;
		case 'G': ghost_kib = atol(optarg); break;
		case 'T': use_timers = 1; break;
		case 'W': use_rewrite = 1; break;
		case 'Z': use_zap = 1; break;
		case 'V': use_move = 1; break;
		case 'C': use_churn = 1; break;
		case 'c': churn_rate = atol(optarg); break;
		case 'K': use_fork = 1; break;
		default:
			fprintf(stderr, "usage: memcheck -r REPORT [-m MIB] [-t N] [-p] [-n] [-s] [-f FILE] [-x CODE] [-M] [-g DIR [-G KIB]] [-T]\n");
			return 2;
		}
	}
	if (!report_path || nthreads < 0 || nthreads > MAXT) {
		fprintf(stderr, "memcheck: -r REPORT is required, -t at most %d\n", MAXT);
		return 2;
	}
	if (getrandom(&token, sizeof token, 0) != sizeof token) {
		perror("getrandom");
		return 1;
	}
	mem_size = (size_t)mib << 20;
	mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	for (size_t i = 0; i < mem_size / PAGE; i++) {
		if (page_kind(i) == 1)
			memset(mem + i * PAGE, 0, PAGE);
		else if (page_kind(i) == 2)
			fill_page(i);
	}
	if (outfile) {
		out_fd = open(outfile, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (out_fd < 0) {
			perror(outfile);
			return 1;
		}
	}

	if (use_churn) {
		size_t churn_size = churn_rate ? 64 << 20 : mem_size;
		churn_pages = churn_size / PAGE;
		churn = mmap(NULL, churn_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (churn == MAP_FAILED) {
			perror("mmap churn");
			return 1;
		}
		for (size_t i = 0; i < churn_pages; i++)
			for (int w = 0; w < 4096 / 8; w += 64)
				churn[i * (4096 / 8) + w] = churn_gen ^ token;
		churn_gen++;
		clock_gettime(CLOCK_MONOTONIC, &churn_start);
	}
	churn_on = use_churn;
	if (use_maps && setup_maps(argv[0])) {
		perror("mappings");
		return 1;
	}
	if (ghost_dir && setup_ghost(ghost_dir)) {
		perror("ghost file");
		return 1;
	}
	if (use_timers && setup_timers()) {
		perror("timers");
		return 1;
	}
	maps_on = use_maps;
	timers_on = use_timers;

	struct sigaction sa = {0};
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGUSR2, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	if (exit_code >= 0)
		sigaction(SIGINT, &sa, NULL);

	pthread_t t;
	timers_wanted = use_timers;
	for (long i = 0; i < nthreads; i++)
		pthread_create(&t, NULL, worker, (void *)i);
	if (use_timers && nthreads > 0) {
		while (!worker0_tid)
			usleep(1000);
		tgkill(getpid(), worker0_tid, SIGURG);
		/* A timer that signals worker 0 alone (SIGEV_THREAD_ID). */
		struct sigevent sev = {0};
		sev.sigev_notify = SIGEV_THREAD_ID;
		sev.sigev_signo = SIGRTMIN + 2;
		sev._sigev_un._tid = worker0_tid;
		struct itimerspec its = {{0, 10000000}, {0, 10000000}};
		if (timer_create(CLOCK_MONOTONIC, &sev, &thread_timer) || timer_settime(thread_timer, 0, &its, NULL)) {
			perror("thread timer");
			return 1;
		}
	}
	if (use_pipe) {
		if (pipe(pipefd) < 0) {
			perror("pipe");
			return 1;
		}
		pthread_create(&t, NULL, pipe_reader, NULL);
	}
	if (use_sleep)
		pthread_create(&t, NULL, sleeper, NULL);

	int simd_ok = use_simd && __builtin_cpu_supports("avx2");
	__m256i acc = _mm256_set1_epi32(3);
	__m128i acc2 = _mm_set1_epi32(11);
	const __m256i one = _mm256_set1_epi32(1);
	long counter = 0, seq = 0;
	int simd_fail = 0;

	write_report(counter, ++seq, verify());
	for (;;) {
		counter++;
		if (simd_ok) {
			/* Keep values in vector registers across iterations: the
			 * asm barrier forces them to live in registers, and each
			 * iteration checks the running pattern. */
			__asm__ volatile("" : "+x"(acc), "+x"(acc2));
			acc = _mm256_add_epi32(acc, one);
			acc2 = _mm_add_epi32(acc2, _mm_set1_epi32(2));
			int v[8], w[4];
			_mm256_storeu_si256((__m256i *)v, acc);
			_mm_storeu_si128((__m128i *)w, acc2);
			for (int k = 0; k < 8; k++)
				if (v[k] != (int)(3 + counter))
					simd_fail = 1;
			for (int k = 0; k < 4; k++)
				if (w[k] != (int)(11 + 2 * counter))
					simd_fail = 1;
		}
		if (out_fd >= 0) {
			char line[64];
			int n = snprintf(line, sizeof line, "%ld %016llx\n", lines + 1, (unsigned long long)token);
			if (write(out_fd, line, n) == n) {
				lines++;
				out_off += n;
			}
		}
		if (want_pipe) {
			want_pipe = 0;
			if (use_pipe && write(pipefd[1], "x", 1) != 1)
				simd_fail |= 0;
			if (use_fork) {
				pid_t child = fork();
				if (child == 0) {
					char path[4096];
					snprintf(path, sizeof path, "%s.child", report_path);
					FILE *cf = fopen(path, "w");
					if (cf) {
						if (verify())
							fprintf(cf, "child=ok\n");
						else
							fprintf(cf, "child=fail: %s\n", fail_reason);
						fclose(cf);
					}
					_exit(0);
				}
				if (child > 0)
					waitpid(child, NULL, 0);
			}
			if (use_rewrite && mem_size >= 110 * PAGE) {
				for (size_t pg = 100; pg < 110; pg++)
					if (page_kind(pg) == 2)
						fill_page(pg);
					else
						memset(mem + pg * PAGE, 0, PAGE);
			}
			if (use_move && !moved_to && mem_size >= (4 << 20)) {
				size_t pages = mem_size / PAGE, half = pages / 2;
				/* A spot the kernel picks, then the move onto it. */
				void *res = mmap(NULL, (pages - half) * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
				unsigned char *to = MAP_FAILED;
				if (res != MAP_FAILED)
					to = mremap(mem + half * PAGE, (pages - half) * PAGE, (pages - half) * PAGE,
						    MREMAP_MAYMOVE | MREMAP_FIXED, res);
				if (to != MAP_FAILED) {
					moved_to = to;
					moved_from = half;
					hole_from = half / 4;
					hole_to = hole_from + (1 << 20) / PAGE;
					munmap(mem + hole_from * PAGE, (hole_to - hole_from) * PAGE);
				}
			}
			if (use_zap && mem_size >= 210 * PAGE) {
				madvise(mem + 200 * PAGE, 10 * PAGE, MADV_DONTNEED);
				zapped = 1;
			}
			if (use_timers) {
				sigset_t m;
				sigemptyset(&m);
				sigaddset(&m, SIGRTMIN);
				sigprocmask(SIG_UNBLOCK, &m, NULL);
			}
		}
		if (want_report) {
			want_report = 0;
			int ok = verify();
			if (ok && simd_fail) {
				snprintf(fail_reason, sizeof fail_reason, "SIMD register state corrupted");
				ok = 0;
			}
			write_report(counter, ++seq, ok);
		}
		if (want_exit)
			return exit_code;
		if (churn_on)
			churn_step();
		else
			usleep(1000);
	}
}
