/*
 * tcpecho: a TCP server whose connections must survive checkpoint/restore.
 *
 * It draws a random token kept only in memory, listens on 127.0.0.1 (port
 * chosen by the kernel) and keeps every connection it accepts. For each
 * line a client sends it answers "TOKEN N LINE", N counting the lines of
 * that connection. The line "big" makes it send 4 MiB of a pattern
 * derived from the token ("TOKEN big" first): far more than the client
 * reads at once, so a checkpoint finds data in the socket's send queue.
 * The line "half" shuts the connection down for writing (the client sees
 * the end of the stream; the server goes to FIN_WAIT2) and makes it count
 * the lines it still receives ("halfread" in the report).
 * Nonblocking, one poll loop. On SIGUSR1 it writes a report (key=value
 * lines, renamed into place) with the port and the number of connections.
 *
 *   -r PATH  report path (required)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXC 16
#define BIG (4 << 20)

static volatile sig_atomic_t want_report;
static void on_usr1(int sig) { (void)sig; want_report = 1; }

struct conn {
	int fd;
	long lines;
	char in[4096];
	size_t inlen;
	unsigned char *out; /* pending output */
	size_t outlen, outoff;
	int half; /* shut down for writing */
};

static uint64_t token;
static long halfread;
static struct conn conns[MAXC];
static int nconn;

static void queue(struct conn *c, const void *p, size_t n)
{
	c->out = realloc(c->out, c->outlen + n);
	memcpy(c->out + c->outlen, p, n);
	c->outlen += n;
}

static void flush(struct conn *c)
{
	while (c->outoff < c->outlen) {
		ssize_t n = write(c->fd, c->out + c->outoff, c->outlen - c->outoff);
		if (n <= 0)
			return;
		c->outoff += n;
	}
	free(c->out);
	c->out = NULL;
	c->outlen = c->outoff = 0;
}

static void line(struct conn *c, const char *l)
{
	char buf[4200];
	c->lines++;
	if (c->half) {
		halfread++;
		return;
	}
	if (strcmp(l, "half") == 0) {
		flush(c);
		shutdown(c->fd, SHUT_WR);
		c->half = 1;
		return;
	}
	if (strcmp(l, "big") == 0) {
		int n = snprintf(buf, sizeof buf, "%016llx big\n", (unsigned long long)token);
		queue(c, buf, n);
		unsigned char *b = malloc(BIG);
		uint64_t s = token;
		for (size_t i = 0; i < BIG; i++) {
			s ^= s << 13, s ^= s >> 7, s ^= s << 17;
			b[i] = (unsigned char)s;
		}
		queue(c, b, BIG);
		free(b);
		return;
	}
	int n = snprintf(buf, sizeof buf, "%016llx %ld %s\n", (unsigned long long)token, c->lines, l);
	queue(c, buf, n);
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
	signal(SIGPIPE, SIG_IGN);
	int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t al = sizeof a;
	if (bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 8) < 0 || getsockname(l, (struct sockaddr *)&a, &al) < 0)
		return 1;
	long seq = 0;
	want_report = 1;
	for (;;) {
		if (want_report) {
			want_report = 0;
			char tmp[4096];
			snprintf(tmp, sizeof tmp, "%s.tmp", rp);
			FILE *f = fopen(tmp, "w");
			if (f) {
				fprintf(f, "status=ok\npid=%d\ntoken=%016llx\ncounter=%d\nport=%d\nhalfread=%ld\nseq=%ld\n", getpid(),
					(unsigned long long)token, nconn, ntohs(a.sin_port), halfread, ++seq);
				fclose(f);
				rename(tmp, rp);
			}
		}
		struct pollfd p[MAXC + 1];
		p[0] = (struct pollfd){l, POLLIN, 0};
		for (int i = 0; i < nconn; i++)
			p[i + 1] = (struct pollfd){conns[i].fd, POLLIN | (conns[i].outlen ? POLLOUT : 0), 0};
		if (poll(p, nconn + 1, 50) <= 0)
			continue;
		if ((p[0].revents & POLLIN) && nconn < MAXC) {
			int c = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
			if (c >= 0)
				conns[nconn++] = (struct conn){.fd = c};
		}
		for (int i = 0; i < nconn; i++) {
			struct conn *c = &conns[i];
			if (p[i + 1].revents & POLLIN) {
				ssize_t n = read(c->fd, c->in + c->inlen, sizeof c->in - 1 - c->inlen);
				if (n > 0) {
					c->inlen += n;
					char *nl;
					while ((nl = memchr(c->in, '\n', c->inlen))) {
						*nl = 0;
						line(c, c->in);
						size_t used = nl + 1 - c->in;
						memmove(c->in, nl + 1, c->inlen - used);
						c->inlen -= used;
					}
				}
			}
			if (c->outlen)
				flush(c);
		}
	}
}
