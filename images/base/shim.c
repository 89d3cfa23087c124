/*
 * criu-supervisor-shim: the image's entrypoint. Blocks the signals the
 * supervisor handles, then execs the supervisor (its sibling in the same
 * directory), which unblocks them once its handlers are installed.
 *
 * Why: the supervisor is PID 1 of its container, and the kernel drops a signal
 * sent to a namespace's init while that signal's disposition is the default
 * (pid_namespaces(7); kernel/signal.c, sig_task_ignored). Python needs tens of
 * milliseconds before it can install a handler, so a `docker stop` in that
 * window was lost. A *blocked* signal is never ignored (sig_ignored: "the
 * signal handler may change by the time it is unblocked"): it stays pending
 * across execve(2) (the mask is inherited) until the supervisor unblocks it.
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static const int handled[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGPWR, SIGCHLD};

int main(int argc, char **argv)
{
	char self[PATH_MAX], target[PATH_MAX];
	sigset_t set;
	ssize_t length;
	char *slash;
	size_t i;

	(void)argc;
	sigemptyset(&set);
	for (i = 0; i < sizeof(handled) / sizeof(handled[0]); i++)
		sigaddset(&set, handled[i]);
	if (sigprocmask(SIG_BLOCK, &set, NULL) != 0) {
		fprintf(stderr, "criu-supervisor: cannot block signals: %s\n", strerror(errno));
		return 4;
	}
	length = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (length <= 0 || length >= (ssize_t)sizeof(self) - 1) {
		fprintf(stderr, "criu-supervisor: cannot find where this shim is (/proc/self/exe): %s\n", strerror(errno));
		return 4;
	}
	self[length] = '\0';
	slash = strrchr(self, '/');
	*slash = '\0';
	if (snprintf(target, sizeof(target), "%s/criu-supervisor", self) >= (int)sizeof(target)) {
		fprintf(stderr, "criu-supervisor: path too long: %s\n", self);
		return 4;
	}
	argv[0] = target;
	execv(target, argv);
	fprintf(stderr, "criu-supervisor: cannot run %s: %s\n", target, strerror(errno));
	return errno == ENOENT ? 127 : 126;
}
