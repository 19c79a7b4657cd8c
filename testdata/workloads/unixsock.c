/*
 * unixsock: unix sockets that verify themselves across checkpoint/restore.
 *
 * It draws a random token kept only in memory, then sets up, all inside
 * itself:
 *   - a stream socketpair with 200000 bytes queued one way (a pattern from
 *     the token) and "back" the other way;
 *   - a datagram socketpair with three datagrams of 1, 100 and 3000 bytes
 *     queued, and a seqpacket socketpair with two records queued;
 *   - a stream socketpair one end of which shut down writing after "last"
 *     (the other end reads "last", then the end of the stream);
 *   - a listening stream socket bound to PATH (-l) and one bound to an
 *     abstract name ("\0ferry-unixsock-PID"), each answering "TOKEN N\n"
 *     to whoever connects, nonblocking in one poll loop.
 * On SIGUSR1 it writes a report (key=value lines, renamed into place); the
 * first SIGUSR2 reads every queue and checks it byte for byte and message
 * for message ("queues=ok" in the next report, or a reason).
 *
 *   -l PATH  where to bind the path socket (required)
 *   -r PATH  report path (required)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define BULK 200000

static volatile sig_atomic_t want_report, want_check;
static void on_sig(int sig)
{
	if (sig == SIGUSR1)
		want_report = 1;
	else
		want_check = 1;
}

static uint64_t token;
static int st[2], dg[2], sp[2], sh[2], lpath, labs_;
static char fail[256];
static const char *queues = "unchecked";

static unsigned char pat(size_t i)
{
	uint64_t s = token ^ (i / 8 * 0x9e3779b97f4a7c15ULL);
	s ^= s << 13, s ^= s >> 7, s ^= s << 17;
	return (unsigned char)(s >> (i % 8 * 8));
}

static void check(void)
{
	static unsigned char buf[BULK + 16];
	size_t got = 0;
	while (got < BULK + 1) {
		ssize_t n = recv(st[1], buf + got, sizeof buf - got, MSG_DONTWAIT);
		if (n <= 0)
			break;
		got += n;
	}
	if (got != BULK) {
		snprintf(fail, sizeof fail, "stream queue holds %zu bytes, want %d", got, BULK);
		return;
	}
	for (size_t i = 0; i < BULK; i++)
		if (buf[i] != pat(i)) {
			snprintf(fail, sizeof fail, "stream byte %zu differs", i);
			return;
		}
	ssize_t n = recv(st[0], buf, sizeof buf, MSG_DONTWAIT);
	if (n != 4 || memcmp(buf, "back", 4)) {
		snprintf(fail, sizeof fail, "reverse stream queue: %zd bytes", n);
		return;
	}
	size_t sizes[] = {1, 100, 3000};
	for (int i = 0; i < 3; i++) {
		n = recv(dg[1], buf, sizeof buf, MSG_DONTWAIT);
		if (n != (ssize_t)sizes[i] || buf[0] != (unsigned char)('a' + i) || buf[n - 1] != (unsigned char)('a' + i)) {
			snprintf(fail, sizeof fail, "datagram %d: %zd bytes", i, n);
			return;
		}
	}
	if (recv(dg[1], buf, sizeof buf, MSG_DONTWAIT) >= 0) {
		snprintf(fail, sizeof fail, "a fourth datagram");
		return;
	}
	for (int i = 0; i < 2; i++) {
		n = recv(sp[1], buf, sizeof buf, MSG_DONTWAIT);
		if (n != 10 + i || buf[0] != (unsigned char)('x' + i)) {
			snprintf(fail, sizeof fail, "record %d: %zd bytes", i, n);
			return;
		}
	}
	n = recv(sh[1], buf, sizeof buf, MSG_DONTWAIT);
	if (n != 4 || memcmp(buf, "last", 4)) {
		snprintf(fail, sizeof fail, "shut-down pair: %zd bytes before the end", n);
		return;
	}
	if ((n = recv(sh[1], buf, sizeof buf, MSG_DONTWAIT)) != 0) {
		snprintf(fail, sizeof fail, "shut-down pair: no end of stream (%zd)", n);
		return;
	}
	if (send(sh[0], "x", 1, MSG_DONTWAIT) != -1 || errno != EPIPE) {
		snprintf(fail, sizeof fail, "shut-down pair: could still send");
		return;
	}
	queues = "ok";
}

static int listen_at(struct sockaddr_un *a, socklen_t len)
{
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (s < 0 || bind(s, (struct sockaddr *)a, len) < 0 || listen(s, 9) < 0) {
		perror("listen");
		exit(1);
	}
	return s;
}

int main(int argc, char **argv)
{
	const char *rp = NULL, *lp = NULL;
	for (int o; (o = getopt(argc, argv, "r:l:")) != -1;) {
		if (o == 'r')
			rp = optarg;
		if (o == 'l')
			lp = optarg;
	}
	if (!rp || !lp || getrandom(&token, sizeof token, 0) != sizeof token)
		return 2;
	signal(SIGUSR1, on_sig);
	signal(SIGUSR2, on_sig);
	signal(SIGPIPE, SIG_IGN);
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, st) || socketpair(AF_UNIX, SOCK_DGRAM, 0, dg) ||
	    socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sp) || socketpair(AF_UNIX, SOCK_STREAM, 0, sh))
		return 1;
	if (send(sh[0], "last", 4, 0) != 4 || shutdown(sh[0], SHUT_WR))
		return 1;
	int big = BULK * 2;
	setsockopt(st[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
	setsockopt(st[1], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
	static unsigned char buf[BULK];
	for (size_t i = 0; i < BULK; i++)
		buf[i] = pat(i);
	for (size_t off = 0; off < BULK;) {
		ssize_t n = send(st[0], buf + off, BULK - off, 0);
		if (n <= 0)
			return 1;
		off += n;
	}
	if (send(st[1], "back", 4, 0) != 4)
		return 1;
	size_t sizes[] = {1, 100, 3000};
	for (int i = 0; i < 3; i++) {
		memset(buf, 'a' + i, sizes[i]);
		if (send(dg[0], buf, sizes[i], 0) != (ssize_t)sizes[i])
			return 1;
	}
	for (int i = 0; i < 2; i++) {
		memset(buf, 'x' + i, 10 + i);
		if (send(sp[0], buf, 10 + i, 0) != 10 + i)
			return 1;
	}
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	snprintf(a.sun_path, sizeof a.sun_path, "%s", lp);
	unlink(lp);
	lpath = listen_at(&a, sizeof a);
	struct sockaddr_un ab = {.sun_family = AF_UNIX};
	int alen = snprintf(ab.sun_path + 1, sizeof ab.sun_path - 1, "ferry-unixsock-%d", getpid());
	labs_ = listen_at(&ab, offsetof(struct sockaddr_un, sun_path) + 1 + alen);

	long seq = 0, served = 0;
	want_report = 1;
	for (;;) {
		if (want_check) {
			want_check = 0;
			if (strcmp(queues, "unchecked") == 0) {
				check();
				if (fail[0])
					queues = "fail";
			}
		}
		if (want_report) {
			want_report = 0;
			char tmp[4096];
			snprintf(tmp, sizeof tmp, "%s.tmp", rp);
			FILE *f = fopen(tmp, "w");
			if (f) {
				fprintf(f, "status=%s\n", fail[0] ? "fail" : "ok");
				if (fail[0])
					fprintf(f, "reason=%s\n", fail);
				fprintf(f, "pid=%d\ntoken=%016llx\ncounter=%ld\nqueues=%s\nseq=%ld\n", getpid(),
					(unsigned long long)token, served, queues, ++seq);
				fclose(f);
				rename(tmp, rp);
			}
		}
		struct pollfd p[2] = {{lpath, POLLIN, 0}, {labs_, POLLIN, 0}};
		if (poll(p, 2, 50) <= 0)
			continue;
		for (int i = 0; i < 2; i++) {
			if (!(p[i].revents & POLLIN))
				continue;
			int c = accept4(p[i].fd, NULL, NULL, SOCK_CLOEXEC);
			if (c < 0)
				continue;
			char line[64];
			int n = snprintf(line, sizeof line, "%016llx %ld\n", (unsigned long long)token, ++served);
			if (write(c, line, n) != n)
				served--;
			close(c);
		}
	}
}
