/*
 * criu-supervisor-shim: how the drop-in bundle (/opt/criu-supervisor) starts its Python programs.
 * Static, so it runs in any image, even one with no libc at all.
 *
 * The bundle's executables are started through the bundle's own glibc loader with the bundle's
 * library path, never through the image's loader: the image may be another distribution, use musl,
 * or hold no libraries at all. Nothing is put in the environment for that (no LD_LIBRARY_PATH,
 * PYTHONPATH or PATH), so the app's environment stays exactly the one its image defines:
 *     libexec/NAME --library-path lib --argv0 ARGV0 lib/programs/python3.13 ARGS
 * where libexec/NAME is a symbolic link to lib/ld-linux-x86-64.so.2, so that the process is called
 * NAME in ps and /proc/PID/comm (the kernel names a process after the path it was started by).
 *
 * Started as criu-supervisor or criu-supervisor-shim (the image's entrypoint): blocks the signals
 * the supervisor handles, then runs the supervisor, which unblocks them once its handlers are
 * installed. Why: the supervisor is PID 1 of its container, and the kernel drops a signal sent to a
 * namespace's init while that signal's disposition is the default (pid_namespaces(7);
 * kernel/signal.c, sig_task_ignored). Python needs tens of milliseconds before it can install a
 * handler, so a `docker stop` in that window was lost. A *blocked* signal is never ignored
 * (sig_ignored: "the signal handler may change by the time it is unblocked"): it stays pending
 * across execve(2) (the mask is inherited) until the supervisor unblocks it.
 *
 * Started as python3 (bin/python3; the base image's /usr/bin/python3 for apps): runs the bundle's
 * Python with its arguments, signals untouched; as criu, CRIU. Started as another NAME (supervisord,
 * supervisorctl): runs lib/NAME.py with the bundle's Python, as NAME, signals untouched.
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PYTHON "lib/programs/python3.13"

static const int handled[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGPWR, SIGCHLD};

static char root[PATH_MAX]; /* the bundle's directory: where this shim is, less bin/ */

static char *under_root(const char *relative)
{
	static char paths[8][PATH_MAX];
	static int used;
	char *path;

	if (used == 8)
		exit(4);
	path = paths[used++];
	if (snprintf(path, PATH_MAX, "%s/%s", root, relative) >= PATH_MAX) {
		fprintf(stderr, "criu-supervisor: path too long: %s/%s\n", root, relative);
		exit(4);
	}
	return path;
}

/* Exec lib/programs/PROGRAM through the loader's link libexec/NAME; `extra` go before the caller's arguments. */
static int run(const char *name, const char *program, const char *argv0, char **extra, int n_extra, int argc,
	       char **argv)
{
	char link[64];
	char **args = calloc((size_t)argc + (size_t)n_extra + 8, sizeof(char *));
	char *loader;
	int n = 0, i;

	snprintf(link, sizeof(link), "libexec/%s", name);
	loader = under_root(link);
	if (args == NULL)
		return 4;
	args[n++] = (char *)name;
	args[n++] = "--library-path";
	args[n++] = under_root("lib");
	args[n++] = "--argv0";
	args[n++] = (char *)argv0;
	args[n++] = under_root(program);
	for (i = 0; i < n_extra; i++)
		args[n++] = extra[i];
	for (i = 1; i < argc; i++)
		args[n++] = argv[i];
	args[n] = NULL;
	execv(loader, args);
	fprintf(stderr, "criu-supervisor: cannot run %s: %s (is the bundle whole? copy all of %s)\n", loader,
		strerror(errno), root);
	return errno == ENOENT ? 127 : 126;
}

int main(int argc, char **argv)
{
	const char *name = argc > 0 ? strrchr(argv[0], '/') : NULL;
	char *supervisor[2];
	sigset_t set;
	ssize_t length;
	size_t i;

	name = name != NULL ? name + 1 : (argc > 0 ? argv[0] : "");
	length = readlink("/proc/self/exe", root, sizeof(root) - 1);
	if (length <= 0 || length >= (ssize_t)sizeof(root) - 1) {
		fprintf(stderr, "criu-supervisor: cannot find where this shim is (/proc/self/exe): %s\n", strerror(errno));
		return 4;
	}
	root[length] = '\0';
	for (i = 0; i < 2; i++) { /* .../bin/criu-supervisor-shim -> ... */
		char *slash = strrchr(root, '/');

		if (slash == NULL)
			return 4;
		*slash = '\0';
	}

	if (strcmp(name, "python3") == 0)
		return run("python3", PYTHON, argv[0], NULL, 0, argc, argv);
	if (strcmp(name, "criu") == 0)
		return run("criu", "lib/programs/criu", argv[0], NULL, 0, argc, argv);
	if (strcmp(name, "criu-supervisor") != 0 && strcmp(name, "criu-supervisor-shim") != 0) {
		char relative[96];
		char *tool[1];

		if (snprintf(relative, sizeof(relative), "lib/%s.py", name) >= (int)sizeof(relative) ||
		    access(under_root(relative), F_OK) != 0) {
			fprintf(stderr, "criu-supervisor: started as %s, which the bundle in %s does not provide\n", name,
				root);
			return 127;
		}
		tool[0] = under_root(relative);
		return run(name, PYTHON, under_root("bin/python3"), tool, 1, argc, argv);
	}

	sigemptyset(&set);
	for (i = 0; i < sizeof(handled) / sizeof(handled[0]); i++)
		sigaddset(&set, handled[i]);
	if (sigprocmask(SIG_BLOCK, &set, NULL) != 0) {
		fprintf(stderr, "criu-supervisor: cannot block signals: %s\n", strerror(errno));
		return 4;
	}
	supervisor[0] = "-I"; /* isolated: the app's PYTHON* variables and working directory play no part */
	supervisor[1] = under_root("lib/criu-supervisor.py");
	return run("criu-supervisor", PYTHON, under_root("bin/python3"), supervisor, 2, argc, argv);
}
