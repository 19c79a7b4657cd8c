/*
 * seccheck: seccomp filters that must survive checkpoint/restore, per
 * thread. The main thread installs filter A (getppid fails with errno 77)
 * before making threads U and T, which inherit it; T then adds filter B
 * (getpgid: errno 78), and the main thread, after the threads exist, adds
 * filter C (getsid: errno 79) with SECCOMP_FILTER_FLAG_LOG. On SIGUSR1
 * each thread tries the three calls and the report says what they got
 * (main=77,0,79 u=77,0,0 t=77,78,0 expected; 0: the call worked) and how
 * many filters /proc shows for each (filters=2,1,2); status is fail if
 * any differs.
 *
 *   -r PATH  report path (required)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "report.h"

/* filter returns errno err for system call nr, and allows the rest. */
static int filter(int nr, int err, unsigned flags)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | err),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog p = {sizeof f / sizeof f[0], f};
	return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &p);
}

/* try returns the errno system call nr fails with, 0 if it works. */
static int try(int nr)
{
	return syscall(nr, 0) < 0 ? errno : 0;
}

struct probe {
	pid_t tid;
	int got[3];
};
static struct probe probes[3]; /* main, u, t */
static volatile int asked, answered;

static void run_probe(struct probe *p)
{
	p->tid = gettid();
	p->got[0] = try(SYS_getppid);
	p->got[1] = try(SYS_getpgid);
	p->got[2] = try(SYS_getsid);
}

static int filters(pid_t tid)
{
	char path[64], line[256];
	int n = -1;
	snprintf(path, sizeof path, "/proc/self/task/%d/status", tid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f))
		if (sscanf(line, "Seccomp_filters: %d", &n) == 1)
			break;
	fclose(f);
	return n;
}

static volatile int t_ready;

static void *thread(void *arg)
{
	struct probe *p = arg;
	if (p == &probes[2]) {
		if (filter(SYS_getpgid, 78, 0))
			return NULL;
		t_ready = 1;
	}
	for (int seen = 0;;) {
		if (asked != seen) {
			seen = asked;
			run_probe(p);
			__sync_fetch_and_add(&answered, 1);
		}
		usleep(1000);
	}
}

static volatile sig_atomic_t want_report;
static void on_usr1(int sig) { (void)sig; want_report = 1; }

int main(int argc, char **argv)
{
	uint64_t token;
	const char *rp = report_start(argc, argv, &token);
	if (!rp)
		return 2;
	signal(SIGUSR1, on_usr1);
	pthread_t u, t;
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || filter(SYS_getppid, 77, 0) ||
	    pthread_create(&u, NULL, thread, &probes[1]) || pthread_create(&t, NULL, thread, &probes[2]))
		return 1;
	while (!t_ready)
		usleep(1000);
	if (filter(SYS_getsid, 79, SECCOMP_FILTER_FLAG_LOG))
		return 1;
	static const int want[3][3] = {{77, 0, 79}, {77, 0, 0}, {77, 78, 0}};
	static const int want_filters[3] = {2, 1, 2};
	long seq = 0, counter = 0;
	want_report = 1;
	for (;;) {
		counter++;
		if (want_report) {
			want_report = 0;
			answered = 0;
			asked++;
			run_probe(&probes[0]);
			while (answered < 2)
				usleep(1000);
			char fail[160] = "";
			int nf[3];
			for (int i = 0; i < 3; i++) {
				nf[i] = filters(probes[i].tid);
				if (memcmp(probes[i].got, want[i], sizeof want[i]) || nf[i] != want_filters[i])
					snprintf(fail, sizeof fail, "thread %d: getppid %d getpgid %d getsid %d, %d filters", i,
						 probes[i].got[0], probes[i].got[1], probes[i].got[2], nf[i]);
			}
			report_write(rp, fail, token, counter, ++seq, "main=%d,%d,%d\nu=%d,%d,%d\nt=%d,%d,%d\nfilters=%d,%d,%d\n",
				     probes[0].got[0], probes[0].got[1], probes[0].got[2], probes[1].got[0], probes[1].got[1],
				     probes[1].got[2], probes[2].got[0], probes[2].got[1], probes[2].got[2], nf[0], nf[1], nf[2]);
		}
		usleep(10000);
	}
}
