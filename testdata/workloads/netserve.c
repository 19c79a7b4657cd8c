/*
 * netserve: listening and unconnected sockets that verify themselves across
 * checkpoint/restore.
 *
 * It draws a random token kept only in memory and opens (ports chosen by
 * the kernel):
 *   - a TCP listener (IPv4) with SO_REUSEADDR, SO_KEEPALIVE, SO_LINGER
 *     {1, 7}, SO_DONTROUTE, TCP_NODELAY, TCP_KEEPIDLE 77, TCP_CORK and a
 *     backlog of 17, nonblocking;
 *   - a TCP listener on :: (IPv6, v4-mapped addresses allowed) with
 *     SO_REUSEPORT, a receive buffer it set (so locked) and a backlog of 5;
 *   - a UDP socket bound to 127.0.0.1 with SO_PRIORITY 5, SO_RCVTIMEO,
 *     SO_NO_CHECK and a two-instruction classic BPF filter that accepts
 *     everything.
 * Each accepted connection gets "TOKEN COUNTER\n" and is closed; each UDP
 * datagram is answered with the same line. On SIGUSR1 it checks every
 * option and address against what it set and writes a report (key=value
 * lines, renamed into place) with the ports.
 *
 *   -r PATH  report path (required)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <linux/filter.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t want_report;
static uint64_t token;
static long served;
#ifndef SO_BUF_LOCK
#define SO_BUF_LOCK 72
#endif
#ifndef SOCK_RCVBUF_LOCK
#define SOCK_RCVBUF_LOCK 2
#endif

static char fail[256];

static void on_usr1(int sig) { (void)sig; want_report = 1; }

static int opt(int s, int level, int name)
{
	int v = -1;
	socklen_t l = sizeof v;
	if (getsockopt(s, level, name, &v, &l) < 0)
		return -1;
	return v;
}

static void must(int ok, const char *what)
{
	if (!ok && !fail[0])
		snprintf(fail, sizeof fail, "%s", what);
}

static int port_of(int s)
{
	struct sockaddr_storage a;
	socklen_t l = sizeof a;
	if (getsockname(s, (struct sockaddr *)&a, &l) < 0)
		return -1;
	if (a.ss_family == AF_INET)
		return ntohs(((struct sockaddr_in *)&a)->sin_port);
	return ntohs(((struct sockaddr_in6 *)&a)->sin6_port);
}

static int tcp4, tcp6, udp, rcvbuf;

static void check(void)
{
	struct linger lg;
	socklen_t l = sizeof lg;
	must(opt(tcp4, SOL_SOCKET, SO_ACCEPTCONN) == 1, "tcp4 not listening");
	must(opt(tcp4, SOL_SOCKET, SO_REUSEADDR) == 1, "tcp4 SO_REUSEADDR");
	must(opt(tcp4, SOL_SOCKET, SO_KEEPALIVE) == 1, "tcp4 SO_KEEPALIVE");
	must(getsockopt(tcp4, SOL_SOCKET, SO_LINGER, &lg, &l) == 0 && lg.l_onoff == 1 && lg.l_linger == 7, "tcp4 SO_LINGER");
	must(opt(tcp4, IPPROTO_TCP, TCP_NODELAY) == 1, "tcp4 TCP_NODELAY");
	must(opt(tcp4, IPPROTO_TCP, TCP_KEEPIDLE) == 77, "tcp4 TCP_KEEPIDLE");
	must(fcntl(tcp4, F_GETFL) & O_NONBLOCK, "tcp4 O_NONBLOCK");
	must(opt(tcp6, SOL_SOCKET, SO_ACCEPTCONN) == 1, "tcp6 not listening");
	must(opt(tcp6, SOL_SOCKET, SO_REUSEPORT) == 1, "tcp6 SO_REUSEPORT");
	must(opt(tcp6, IPPROTO_IPV6, IPV6_V6ONLY) == 0, "tcp6 IPV6_V6ONLY");
	must(opt(tcp6, SOL_SOCKET, SO_REUSEADDR) == 0, "tcp6 SO_REUSEADDR (restore must put it back)");
	must(opt(tcp4, IPPROTO_TCP, TCP_CORK) == 1, "tcp4 TCP_CORK");
	must(opt(tcp4, SOL_SOCKET, SO_DONTROUTE) == 1, "tcp4 SO_DONTROUTE");
	must(opt(tcp6, SOL_SOCKET, SO_RCVBUF) == rcvbuf, "tcp6 SO_RCVBUF");
	must(opt(tcp6, SOL_SOCKET, SO_BUF_LOCK) == SOCK_RCVBUF_LOCK, "tcp6 SO_BUF_LOCK");
	must(opt(udp, SOL_SOCKET, SO_NO_CHECK) == 1, "udp SO_NO_CHECK");
	must(opt(udp, SOL_SOCKET, SO_PRIORITY) == 5, "udp SO_PRIORITY");
	struct timeval tv;
	l = sizeof tv;
	must(getsockopt(udp, SOL_SOCKET, SO_RCVTIMEO, &tv, &l) == 0 && tv.tv_sec == 3 && tv.tv_usec == 0, "udp SO_RCVTIMEO");
	must(opt(udp, SOL_SOCKET, SO_TYPE) == SOCK_DGRAM, "udp type");
	struct sock_filter f[4];
	socklen_t fl = 0;
	must(getsockopt(udp, SOL_SOCKET, SO_ATTACH_FILTER, NULL, &fl) == 0 && fl == 2, "udp filter length");
	fl = 4;
	must(getsockopt(udp, SOL_SOCKET, SO_ATTACH_FILTER, f, &fl) == 0 && f[1].k == 0xffff, "udp filter program");
}

static void report(const char *path, long seq)
{
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	if (!f)
		return;
	check();
	fprintf(f, "status=%s\n", fail[0] ? "fail" : "ok");
	if (fail[0])
		fprintf(f, "reason=%s\n", fail);
	fprintf(f, "pid=%d\ntoken=%016llx\ncounter=%ld\n", getpid(), (unsigned long long)token, served);
	fprintf(f, "tcp4=%d\ntcp6=%d\nudp=%d\nseq=%ld\n", port_of(tcp4), port_of(tcp6), port_of(udp), seq);
	fclose(f);
	rename(tmp, path);
}

int main(int argc, char **argv)
{
	const char *rp = NULL;
	for (int o; (o = getopt(argc, argv, "r:")) != -1;)
		if (o == 'r')
			rp = optarg;
	if (!rp) {
		fprintf(stderr, "usage: netserve -r REPORT\n");
		return 2;
	}
	if (getrandom(&token, sizeof token, 0) != sizeof token)
		return 1;
	signal(SIGUSR1, on_usr1);
	signal(SIGPIPE, SIG_IGN);

	int one = 1, zero = 0, v;
	struct linger lg = {1, 7};
	tcp4 = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	setsockopt(tcp4, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	setsockopt(tcp4, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
	setsockopt(tcp4, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
	setsockopt(tcp4, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	v = 77;
	setsockopt(tcp4, IPPROTO_TCP, TCP_KEEPIDLE, &v, sizeof v);
	setsockopt(tcp4, IPPROTO_TCP, TCP_CORK, &one, sizeof one);
	setsockopt(tcp4, SOL_SOCKET, SO_DONTROUTE, &one, sizeof one);
	struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	if (bind(tcp4, (struct sockaddr *)&a4, sizeof a4) < 0 || listen(tcp4, 17) < 0) {
		perror("tcp4");
		return 1;
	}
	tcp6 = socket(AF_INET6, SOCK_STREAM, 0);
	setsockopt(tcp6, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
	setsockopt(tcp6, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
	v = 100000; /* the kernel keeps twice that, and locks the size */
	setsockopt(tcp6, SOL_SOCKET, SO_RCVBUF, &v, sizeof v);
	rcvbuf = opt(tcp6, SOL_SOCKET, SO_RCVBUF);
	struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_addr = in6addr_any};
	if (bind(tcp6, (struct sockaddr *)&a6, sizeof a6) < 0 || listen(tcp6, 5) < 0) {
		perror("tcp6");
		return 1;
	}
	udp = socket(AF_INET, SOCK_DGRAM, 0);
	v = 5;
	setsockopt(udp, SOL_SOCKET, SO_PRIORITY, &v, sizeof v);
	setsockopt(udp, SOL_SOCKET, SO_NO_CHECK, &one, sizeof one);
	struct timeval tv = {3, 0}; /* whole seconds: the kernel keeps jiffies */
	setsockopt(udp, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	struct sock_filter prog[] = {{BPF_LD | BPF_W | BPF_LEN, 0, 0, 0}, {BPF_RET | BPF_K, 0, 0, 0xffff}};
	struct sock_fprog fp = {2, prog};
	setsockopt(udp, SOL_SOCKET, SO_ATTACH_FILTER, &fp, sizeof fp);
	if (bind(udp, (struct sockaddr *)&a4, sizeof a4) < 0) {
		perror("udp");
		return 1;
	}

	long seq = 0;
	report(rp, ++seq);
	for (;;) {
		if (want_report) {
			want_report = 0;
			report(rp, ++seq);
		}
		struct pollfd p[3] = {{tcp4, POLLIN, 0}, {tcp6, POLLIN, 0}, {udp, POLLIN, 0}};
		if (poll(p, 3, 50) <= 0)
			continue;
		char line[64];
		int n = snprintf(line, sizeof line, "%016llx %ld\n", (unsigned long long)token, served + 1);
		for (int i = 0; i < 2; i++) {
			if (!(p[i].revents & POLLIN))
				continue;
			int c = accept4(p[i].fd, NULL, NULL, SOCK_CLOEXEC);
			if (c < 0)
				continue;
			if (write(c, line, n) == n)
				served++;
			close(c);
		}
		if (p[2].revents & POLLIN) {
			struct sockaddr_storage from;
			socklen_t fl = sizeof from;
			char buf[64];
			if (recvfrom(udp, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl) >= 0 &&
			    sendto(udp, line, n, 0, (struct sockaddr *)&from, fl) == n)
				served++;
		}
	}
}
