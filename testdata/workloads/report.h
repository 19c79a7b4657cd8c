/*
 * report.h: what the small C workloads share. report_start reads -r PATH
 * (the report's path) and draws the token kept only in memory;
 * report_write writes a report: status (and the reason of a failure),
 * pid, token, counter, seq, then the workload's own key=value lines, into
 * PATH.tmp renamed into place.
 */
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/random.h>
#include <unistd.h>

/* report_start returns the report path, or NULL if -r is missing or no
 * token could be drawn. */
static const char *report_start(int argc, char **argv, uint64_t *token)
{
	const char *rp = NULL;
	for (int o; (o = getopt(argc, argv, "r:")) != -1;)
		if (o == 'r')
			rp = optarg;
	if (!rp || getrandom(token, sizeof *token, 0) != sizeof *token)
		return NULL;
	return rp;
}

/* report_write writes the report; extra (printf-style, may be "") holds
 * the workload's own lines. */
static void report_write(const char *rp, const char *fail, uint64_t token, long counter, long seq, const char *extra, ...)
{
	char tmp[PATH_MAX + 8];
	snprintf(tmp, sizeof tmp, "%s.tmp", rp);
	FILE *f = fopen(tmp, "w");
	if (!f)
		return;
	fprintf(f, "status=%s\n", fail[0] ? "fail" : "ok");
	if (fail[0])
		fprintf(f, "reason=%s\n", fail);
	fprintf(f, "pid=%d\ntoken=%016llx\ncounter=%ld\nseq=%ld\n", getpid(), (unsigned long long)token, counter, seq);
	va_list ap;
	va_start(ap, extra);
	vfprintf(f, extra, ap);
	va_end(ap);
	fclose(f);
	rename(tmp, rp);
}
