"""Starting the app fresh: its own PID and IPC namespaces, a session, an init.

    supervisor (container PID 1)
      └── tini            PID 1 of the app's namespace, session leader  <- dumped tree root
            └── CMD ...   the app

Why each piece:
- A private PID namespace makes the app's PIDs independent of whatever else runs
  in the container, so CRIU can give them back exactly (clone3 set_tid) in the
  replacement container.
- A private IPC namespace lets CRIU carry SysV shared memory and semaphores.
- The tree must be its own session: CRIU refuses "session leader is outside of
  its pid namespace".
- tini at the namespace's PID 1 reaps zombies and passes signals on, and exits
  with the app's status (128+N for a signal, 126/127 for exec failures).
- The supervisor itself is never inside the dumped tree.

We double-fork: the middle process unshares, forks the namespace init and exits
at once, so the init is re-parented to us (PID 1 or a child subreaper) and we
can waitpid() it exactly as we will a restored tree (CRIU's rst_sibling).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import sys

from supervisor_pkg import bundle, signals
from supervisor_pkg.errors import CommandNotExecutable, CommandNotFound, EnvironmentProblem

_PR_SET_CHILD_SUBREAPER = 36
# From <linux/sched.h>; os.CLONE_* and os.unshare() only exist from Python 3.12.
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000


def _unshare(flags: int) -> None:
    if hasattr(os, "unshare"):
        os.unshare(flags)
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.unshare(flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def become_subreaper() -> None:
    """Orphans of our children come to us even when we are not PID 1 (tests, `--init`)."""
    if os.getpid() == 1:
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise EnvironmentProblem(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")


def check_command(cmd: list[str]) -> str:
    """Resolve CMD the way execvp would, so a typo gets a clear line, not a dump of nothing."""
    program = cmd[0]
    if "/" in program:
        if not os.path.exists(program):
            raise CommandNotFound(f"command not found: {program}")
        if os.path.isdir(program) or not os.access(program, os.X_OK):
            raise CommandNotExecutable(f"command is not executable: {program} (check its mode and shebang)")
        return program
    found = shutil.which(program)
    if found is None:
        raise CommandNotFound(f"command not found in PATH: {program}")
    return found


def namespace_members(init_pid: int) -> list[int]:
    """Every process in the PID namespace whose init is `init_pid` (as our PIDs)."""
    try:
        namespace = os.readlink(f"/proc/{init_pid}/ns/pid_for_children")
    except OSError:
        return []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                    members.append(int(entry))
            except OSError:
                continue  # exited meanwhile
    return members


def resume(init_pid: int) -> None:
    """SIGCONT the whole app tree (CRIU left it stopped after a dump)."""
    for pid in namespace_members(init_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def environment_at_start(proc_environ: str = "/proc/self/environ") -> dict[str, str]:
    """The environment this process was started with: the image's and the engine's (`docker run -e`).

    What a fresh app is given, rather than os.environ, which Python changes at
    start-up: under the C locale (no LANG, as in most images) it sets
    LC_CTYPE=C.UTF-8 for its children (PEP 538). /proc/self/environ is the
    block execve(2) put in place, untouched by later changes. As in os.environ,
    the first of two entries with one name wins.
    """
    try:
        with open(proc_environ, "rb") as handle:
            block = handle.read()
    except OSError:
        return dict(os.environ)
    environment: dict[str, str] = {}
    for entry in block.split(b"\0"):
        name, separator, value = entry.partition(b"=")
        if separator and name:
            environment.setdefault(os.fsdecode(name), os.fsdecode(value))
    return environment


IO_URING_SYSCALLS = ("io_uring_setup", "io_uring_enter", "io_uring_register")
IPPROTO_MPTCP = 262  # <linux/in.h>


def check_seccomp_filter_available(settings: str = "CKPT_IO_URING=deny") -> None:
    """The app's seccomp filter (_deny_to_the_app) needs libseccomp's Python bindings; `settings` names who asks."""
    try:
        import seccomp  # type: ignore[import-not-found]  # noqa: F401  (Debian's python3-seccomp)
    except ImportError as error:
        raise EnvironmentProblem(
            f"{settings} needs libseccomp's Python bindings (Debian: python3-seccomp; the base image has them); "
            "install them or set CKPT_IO_URING=allow and CKPT_MPTCP=allow"
        ) from error


def _deny_to_the_app(io_uring: bool, mptcp: bool) -> None:  # pragma: no cover - runs in the child
    """One seccomp filter for the app and its children: what CRIU cannot dump fails as on an older kernel.

    - io_uring (`io_uring`): CRIU cannot dump an instance ("Unknown shit 600
      (anon_inode:[io_uring])"). io_uring_*() fail with ENOSYS; runtimes that
      probe for it (libuv in Node.js 20, even with UV_USE_IO_URING=0) take
      that for "kernel too old" and use epoll instead.
    - Multipath TCP (`mptcp`): CRIU dumps no MPTCP socket ("inet: Unsupported
      proto 262"). socket(..., IPPROTO_MPTCP) fails with EPROTONOSUPPORT, what
      a kernel without CONFIG_MPTCP answers (net/ipv4/af_inet.c: inet_create
      finds no such protocol). Go >= 1.24, which asks for MPTCP on every
      listener, reads EPROTONOSUPPORT (or EINVAL, from kernels < 5.6) as "not
      supported" and uses plain TCP from then on (net/mptcpsock_linux.go,
      initMPTCPavailable); other errors would make it retry MPTCP later.
      socket()'s protocol is its third argument, so only MPTCP is affected.
    Only these calls are; no_new_privs is left off (we hold CAP_SYS_ADMIN), so
    setuid programs in the app keep working.
    """
    import errno

    import seccomp

    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    rules.set_attr(seccomp.Attr.CTL_NNP, 0)
    if io_uring:
        for name in IO_URING_SYSCALLS:
            rules.add_rule(seccomp.ERRNO(errno.ENOSYS), name)
    if mptcp:
        rules.add_rule(seccomp.ERRNO(errno.EPROTONOSUPPORT), "socket", seccomp.Arg(2, seccomp.EQ, IPPROTO_MPTCP))
    rules.load()


def _mount_own_proc() -> None:  # pragma: no cover - runs in the child
    """In a new mount namespace: stop mount events flowing back, and mount the app's own /proc.

    Made rslave so nothing mounted here leaks into the container, while the
    container's mounts (the volume, /etc/hosts...) stay visible; CRIU then
    carries this namespace (auto_ext_mnt: the container's mounts are external).
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    ms_rec, ms_slave, ms_nosuid, ms_nodev, ms_noexec = 0x4000, 1 << 19, 2, 4, 8
    if libc.mount(None, b"/", None, ms_rec | ms_slave, None) != 0:
        raise OSError(ctypes.get_errno(), "cannot make / a slave mount")
    if libc.mount(b"proc", b"/proc", b"proc", ms_nosuid | ms_nodev | ms_noexec, None) != 0:
        raise OSError(ctypes.get_errno(), "cannot mount the app's /proc")


# What every replacement has, whatever its engine: the default set all engines share (Podman's,
# containers.conf default_capabilities, which Docker's and containerd's contain), plus the four every
# container of ours is given for CRIU. An app started with no more (CKPT_PORTABLE_CAPS=1) restores under
# any engine's defaults: CRIU cannot give a restored process a capability the replacement lacks. The app
# keeps SYS_ADMIN on purpose: CRIU's parasite refuses to dump a task without it whose /proc is the
# container's ("can't dump unprivileged task whose /proc doesn't belong to it").
PORTABLE_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "SETFCAP",
                         "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT", "NET_ADMIN", "SYS_PTRACE", "SYS_ADMIN",
                         "SYS_TIME")
_CAPABILITY_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7,
                    "SETPCAP": 8, "NET_BIND_SERVICE": 10, "NET_ADMIN": 12, "SYS_CHROOT": 18, "SYS_PTRACE": 19,
                    "SYS_ADMIN": 21, "SYS_TIME": 25, "SETFCAP": 31}
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _keep_only_portable_capabilities() -> None:  # pragma: no cover - runs in the child
    """Drop every capability outside PORTABLE_CAPABILITIES from this process's sets, bounding set included."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    keep = sum(1 << _CAPABILITY_BITS[name] for name in PORTABLE_CAPABILITIES)
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        last = int(handle.read())
    for bit in range(last + 1):
        if not keep >> bit & 1 and libc.prctl(_PR_CAPBSET_DROP, bit, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"cannot drop capability {bit} from the bounding set")
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    for index in range(6):  # {effective, permitted, inheritable} x 2 words
        data[index] &= (keep >> (32 * (index // 3))) & 0xFFFFFFFF
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def spawn(
    cmd: list[str], share_ipc: bool = False, deny_io_uring: bool = True, own_proc: bool = False,
    portable_caps: bool = False, environment: dict[str, str] | None = None, deny_mptcp: bool = True,
) -> int:
    """Start CMD under the namespace init; return the init's PID (in our namespace).

    `environment`: the app's environment (default: ours); `portable_caps`: see PORTABLE_CAPABILITIES;
    `deny_io_uring`, `deny_mptcp`: see _deny_to_the_app (CKPT_IO_URING, CKPT_MPTCP).
    """
    if deny_io_uring or deny_mptcp:
        check_seccomp_filter_available(" and ".join(
            setting for setting, on in (("CKPT_IO_URING=deny", deny_io_uring), ("CKPT_MPTCP=deny", deny_mptcp)) if on))
    init_argv = [*bundle.program("tini", static=True), "--", *cmd]
    flags = CLONE_NEWPID | (0 if share_ipc else CLONE_NEWIPC) | (CLONE_NEWNS if own_proc else 0)
    read_fd, write_fd = os.pipe()
    middle = os.fork()
    if middle == 0:  # pragma: no cover - runs in the child
        _middle_child(flags, init_argv, read_fd, write_fd, deny_io_uring, own_proc, portable_caps,
                      dict(os.environ) if environment is None else environment, deny_mptcp)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read().decode()
    os.waitpid(middle, 0)
    if not report.startswith("pid "):
        hint = ""
        if "Operation not permitted" in report:
            hint = ("; creating PID/IPC namespaces needs CAP_SYS_ADMIN: add --cap-add SYS_ADMIN (compose: cap_add; "
                    "Kubernetes: securityContext.capabilities.add)")
        raise EnvironmentProblem(f"could not start the app's namespace: {report or 'no report'}{hint}")
    return int(report.split()[1])


def _middle_child(  # pragma: no cover - runs in the child
    flags: int, init_argv: list[str], read_fd: int, write_fd: int, deny_io_uring: bool, own_proc: bool,
    portable_caps: bool, environment: dict[str, str], deny_mptcp: bool = True,
) -> None:
    try:
        os.close(read_fd)
        signals.reset_in_child()
        _unshare(flags)
        init_pid = os.fork()
        if init_pid == 0:
            os.close(write_fd)
            os.setsid()
            try:
                if own_proc:
                    _mount_own_proc()
                if deny_io_uring or deny_mptcp:
                    _deny_to_the_app(io_uring=deny_io_uring, mptcp=deny_mptcp)
                if portable_caps:  # after the filter: installing it needs CAP_SYS_ADMIN (no_new_privs is off)
                    _keep_only_portable_capabilities()
                os.execvpe(init_argv[0], init_argv, environment)
            except Exception as error:  # noqa: BLE001 - report, never return into the parent's code
                print(f"criu-supervisor: cannot start {init_argv[0]}: {error}", file=sys.stderr)
                os._exit(127)
        os.write(write_fd, f"pid {init_pid}".encode())
        os._exit(0)
    except BaseException as error:  # report anything, never return into the parent's code
        try:
            os.write(write_fd, f"{type(error).__name__}: {error}".encode())
        finally:
            os._exit(1)
