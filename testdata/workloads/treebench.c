/*
 * treebench: a wide process tree for the tree benchmark (bench -suites
 * tree): the root forks -p PROCS-1 children; every process runs -t
 * THREADS-1 extra threads (sleeping) and opens -f FDS descriptors, in
 * turn a regular file, a pipe (two fds), an eventfd and an epoll watching
 * that eventfd. When all are set up the root writes a report ("seq=1") to -r PATH.
 * Every process then sleeps until killed.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

static void *sleeper(void *arg)
{
	(void)arg;
	for (;;)
		pause();
	return NULL;
}

static void setup(int threads, int fds, const char *file)
{
	for (int i = 0, k = 0; i < fds; k++) {
		switch (k % 3) {
		case 0:
			if (open(file, O_RDONLY) < 0)
				exit(1);
			i++;
			break;
		case 1: {
			int p[2];
			if (pipe(p))
				exit(1);
			i += 2;
			break;
		}
		default: {
			int e = eventfd(0, 0);
			int ep = epoll_create1(0);
			struct epoll_event ev = {.events = EPOLLIN};
			if (e < 0 || ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, e, &ev))
				exit(1);
			i += 2;
		}
		}
	}
	for (int i = 1; i < threads; i++) {
		pthread_t t;
		if (pthread_create(&t, NULL, sleeper, NULL))
			exit(1);
	}
}

int main(int argc, char **argv)
{
	int procs = 100, threads = 10, fds = 20;
	const char *ready = NULL;
	for (int o; (o = getopt(argc, argv, "p:t:f:r:")) != -1;) {
		switch (o) {
		case 'p': procs = atoi(optarg); break;
		case 't': threads = atoi(optarg); break;
		case 'f': fds = atoi(optarg); break;
		case 'r': ready = optarg; break;
		}
	}
	if (!ready)
		return 2;
	int sync[2];
	if (pipe(sync))
		return 1;
	for (int i = 1; i < procs; i++) {
		if (fork() == 0) {
			close(sync[0]);
			setup(threads, fds, argv[0]);
			close(sync[1]);
			for (;;)
				pause();
		}
	}
	close(sync[1]);
	setup(threads, fds, argv[0]);
	char c;
	while (read(sync[0], &c, 1) > 0)
		;
	close(sync[0]);
	FILE *f = fopen(ready, "w");
	if (!f)
		return 1;
	fprintf(f, "status=ok\nseq=1\n");
	fclose(f);
	for (;;)
		pause();
}
