"""Every setting: its environment variable, its flag twin, default and parser.

Settings come from the environment (Dockerfile ENV, compose `environment:`,
Kubernetes `env:`); a `run` flag of the same name overrides. The flag is the
variable without `CKPT_`, lower-cased, `_` -> `-` (CKPT_LOG_LEVEL -> --log-level).
Parsing is strict: a bad value raises ConfigError naming the variable and the
accepted values, which `cli` turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import signal
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from supervisor_pkg.errors import ConfigError

# Signals that make sense as the checkpoint signal: catchable, and not the
# ones the supervisor needs for itself (SIGCHLD for reaping).
_CHECKPOINT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPWR")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# A plain decimal: ASCII digits, at most one '.', no sign, exponent, '_' or
# hex. float() and int() accept far more ('١٢', '1_000', '1e309', 'nan',
# '-0', '+5'), none of which a person means as a number of seconds.
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)
_MAX_NUMBER_LENGTH = 20
_PATH_MAX = 4095  # bytes without the terminating NUL (PATH_MAX, linux/limits.h)
_NAME_MAX = 255  # bytes in one path component (NAME_MAX, linux/limits.h)
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) = 108, less the terminating NUL (unix(7))
_KERNEL_TREES = ("/proc", "/sys", "/dev")


def _shown(raw: str) -> str:
    """The value as it is quoted in an error: repr (so control characters show), cut if very long."""
    return repr(raw) if len(raw) <= 300 else f"{raw[:60]!r}... ({len(raw)} characters)"


def _choice(*accepted: str) -> Callable[[str, str], str]:
    def parse(variable: str, raw: str) -> str:
        value = raw.strip().lower()
        if not raw.isascii() or value not in accepted:  # isascii: 'K' (the Kelvin sign).lower() is 'k'
            raise ConfigError(f"{variable}={_shown(raw)} is not valid: accepted values are {', '.join(accepted)}")
        return value

    return parse


def _signal(variable: str, raw: str) -> signal.Signals:
    name = raw.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if not raw.isascii() or name not in _CHECKPOINT_SIGNALS:  # isascii: 'ſigterm'.upper() is 'SIGTERM'
        raise ConfigError(
            f"{variable}={_shown(raw)} is not valid: accepted values are {', '.join(_CHECKPOINT_SIGNALS)}"
        )
    return signal.Signals[name]


def _path_problem(raw: str) -> str | None:
    """Why `raw` cannot be used as a path (beyond being absolute), or None."""
    if not raw.isprintable():  # NUL (which every system call refuses), newlines, undecodable bytes
        return "use printable characters only"
    if len(raw.encode()) > _PATH_MAX or any(len(part.encode()) > _NAME_MAX for part in raw.split("/")):
        return f"a path is at most {_PATH_MAX} bytes, each name in it at most {_NAME_MAX}"
    if any(part in (".", "..") for part in raw.split("/")):
        return "write it without '.' or '..'"
    return None


def _path(variable: str, raw: str) -> str:
    if not raw.startswith("/"):
        raise ConfigError(f"{variable}={_shown(raw)} is not valid: it must be an absolute path")
    problem = _path_problem(raw)
    if problem:
        raise ConfigError(f"{variable}={_shown(raw)} is not valid: {problem}")
    return raw.rstrip("/") or "/"


def _in_kernel_tree(path: str) -> bool:
    return (path.rstrip("/") + "/").startswith(tuple(tree + "/" for tree in _KERNEL_TREES))


def _socket_path(variable: str, raw: str) -> str:
    path = _path(variable, raw)
    if path == "/" or _in_kernel_tree(path):
        raise ConfigError(f"{variable}={_shown(raw)} is not valid: the control socket cannot be / or under "
                          "/proc, /sys or /dev (the kernel's): use e.g. /run/criu-supervisor.sock")
    if len(path.encode()) > _SUN_PATH_MAX:
        raise ConfigError(f"{variable}={_shown(raw)} is not valid: a unix socket's path is at most {_SUN_PATH_MAX} "
                          f"bytes (sun_path, unix(7)), this one is {len(path.encode())}")
    return path


def _lineage_name(variable: str, raw: str) -> str:
    if not _NAME_PATTERN.fullmatch(raw):
        raise ConfigError(
            f"{variable}={_shown(raw)} is not valid: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return raw


def _optional_path(variable: str, raw: str) -> str | None:
    if raw == "":
        return None
    return _path(variable, raw)


def _absolute_paths(variable: str, raw: str) -> tuple[str, ...]:
    """':'-separated absolute paths, without '..' or characters a path should not hold."""
    paths = tuple(part for part in raw.split(":") if part)
    for part in paths:
        if not part.startswith("/") or "/../" in part + "/":
            raise ConfigError(f"{variable}={_shown(raw)} is not valid: expected absolute paths separated by ':'")
        problem = _path_problem(part)
        if problem:
            raise ConfigError(f"{variable}={_shown(raw)} is not valid: in {part[:60]!r}, {problem}")
    return paths


def _path_list(variable: str, raw: str) -> tuple[str, ...]:
    paths = _absolute_paths(variable, raw)
    for part in paths:
        if part.rstrip("/") == "" or _in_kernel_tree(part):
            raise ConfigError(f"{variable}={_shown(raw)} is not valid: {part} cannot be carried (/proc, /sys and "
                              "/dev are the kernel's, not the app's)")
    return tuple(part.rstrip("/") for part in paths)


def _exclude_list(variable: str, raw: str) -> tuple[str, ...]:
    paths = _absolute_paths(variable, raw)
    if any(part.rstrip("/") == "" for part in paths):
        raise ConfigError(f"{variable}={_shown(raw)} is not valid: / cannot be excluded (nothing the app wrote "
                          "would reach the replacement, whose restore then fails): name the paths to leave out")
    return tuple(part.rstrip("/") for part in paths)


TRIGGER_NAMES = ("sigterm", "control", "file", "periodic", "aws", "gcp", "azure", "auto")


def _triggers(variable: str, raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip().lower() for part in raw.split(",") if part.strip()))
    unknown = [name for name in names if name not in TRIGGER_NAMES]
    if unknown or not names:
        raise ConfigError(f"{variable}={_shown(raw)} is not valid: use a comma-separated list of "
                          f"{', '.join(TRIGGER_NAMES)}")
    return names


def _url(variable: str, raw: str) -> str:
    invalid = ConfigError(f"{variable}={_shown(raw)} is not valid: expected an http:// or https:// URL "
                          "with a host, and no user, query or fragment")
    if len(raw) > 2000 or not raw.isascii() or not raw.isprintable() or " " in raw:
        raise invalid
    try:
        parts = urllib.parse.urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError as error:  # e.g. 'http://[::1' (an unclosed IPv6 bracket)
        raise invalid from error
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None
            or parts.query or parts.fragment):
        raise invalid
    return raw.rstrip("/")


def _ip_address(variable: str, raw: str) -> str:
    try:
        address = ipaddress.ip_address(raw.strip())
    except ValueError:
        address = None
    # A scoped address (fe80::1%eth0) would need the interface in every bind; link-local is no use to Prometheus.
    if address is None or getattr(address, "scope_id", None):
        raise ConfigError(f"{variable}={_shown(raw)} is not valid: expected an IPv4 or IPv6 address, e.g. 0.0.0.0 "
                          "(every IPv4 address), :: (every address) or 127.0.0.1 (this container only)")
    return str(address)


def _optional_text(variable: str, raw: str) -> str | None:
    if raw == "":
        return None
    if len(raw) > 200 or not raw.isprintable():
        raise ConfigError(f"{variable}={raw[:40]!r}... is not valid: use at most 200 printable characters")
    return raw


def _toggle(variable: str, raw: str) -> bool:
    if raw.strip() not in ("0", "1"):
        raise ConfigError(f"{variable}={_shown(raw)} is not valid: accepted values are 0, 1")
    return raw.strip() == "1"


@dataclasses.dataclass(frozen=True)
class _Number:
    """A parser of plain decimal numbers from `minimum` to `maximum` (and 0 too, meaning off, if `zero_is_off`).

    Every number has an upper bound: a huge value (1e300) passes float() but
    overflows the time arithmetic and the waits it feeds (OverflowError in
    threading.Event.wait), far from the setting that caused it.
    """

    minimum: float
    maximum: float
    noun: str = "a number of seconds"
    unit: str = " s"
    whole: bool = False
    zero_is_off: bool = False

    @property
    def accepted(self) -> str:
        """The accepted values, as the settings table shows them."""
        span = f"{self.minimum:g}-{self.maximum:g}{self.unit}"
        return f"0 (off) or {span}" if self.zero_is_off else span

    def __call__(self, variable: str, raw: str) -> Any:
        text = raw.strip()  # tolerated: env files and YAML often carry a stray space
        if len(text) <= _MAX_NUMBER_LENGTH and _DECIMAL.fullmatch(text) and not (self.whole and "." in text):
            value: float = int(text) if self.whole else float(text)
            if (self.zero_is_off and value == 0) or self.minimum <= value <= self.maximum:
                return value
        expected = f"{self.noun} from {self.minimum:g} to {self.maximum:g}"
        raise ConfigError(f"{variable}={_shown(raw)} is not valid: expected "
                          + (f"0 (off) or {expected}" if self.zero_is_off else expected))


# The bounds of each number, and why (see _Number: every one has a maximum).
# Generations are whole checkpoints on the volume (page images of the app's
# memory): more than 100 is surely a typo, and fills the volume before it helps.
_KEEP = _Number(1, 100, noun="a whole number", unit="", whole=True)
# A heartbeat rewrites the lease file on the shared volume: 10 a second is
# plenty for NFS; more than an hour apart, a dead holder goes unnoticed for hours.
_LEASE_INTERVAL = _Number(0.1, 3600)
# At least twice the interval (checked in load); a day at most: a dead holder's
# lease blocks every replacement for that long.
_LEASE_TIMEOUT = _Number(0.2, 86400)
# 0: do not wait. A day at most: no orchestrator keeps a replacement waiting longer.
_HANDOFF_TIMEOUT = _Number(0, 86400)
# Each periodic checkpoint freezes the app while CRIU dumps it (0.1 s or more):
# more than once a second it would be frozen most of the time; less than once a
# day is no safety net.
_INTERVAL = _Number(1, 86400, zero_is_off=True)
# The longest notice a cloud gives is minutes (AWS spot 2 min, Azure scheduled
# events 15 min): a margin over an hour only means "at once", so it is a mistake.
_DEADLINE_MARGIN = _Number(0, 3600)
# AWS's notice is 2 minutes: polled less than once a minute, too little of it is
# left to checkpoint in; more than 10 times a second only loads the metadata service.
_POLL_INTERVAL = _Number(0.1, 60)
# CRIU's log and image reads grow every few milliseconds while it works: a second
# without progress is already a stall worth noticing on a slow volume, an hour is a hang.
_RESTORE_STALL = _Number(1, 3600)
_PORT = _Number(1, 65535, noun="a TCP port", unit="", whole=True, zero_is_off=True)


@dataclasses.dataclass(frozen=True)
class Setting:
    variable: str
    default: str
    parse: Callable[[str, str], Any]
    meaning: str

    @property
    def help(self) -> str:
        """The meaning, and for a number the accepted range (taken from its parser, so the two cannot drift)."""
        if isinstance(self.parse, _Number):
            return f"{self.meaning} Accepted: {self.parse.accepted}."
        return self.meaning

    @property
    def flag(self) -> str:
        return "--" + self.variable.removeprefix("CKPT_").lower().replace("_", "-")

    @property
    def field(self) -> str:
        return self.variable.removeprefix("CKPT_").lower()


SETTINGS: tuple[Setting, ...] = (
    Setting("CKPT_DIR", "/checkpoints", _path, "Mount point of the shared checkpoint volume."),
    Setting("CKPT_NAME", "default", _lineage_name,
            "Names this app's lineage of checkpoints, so several apps can share one volume."),
    Setting("CKPT_RESTORE", "auto", _choice("auto", "never", "require"),
            "auto: restore the newest valid checkpoint, else start fresh; never: always start "
            "fresh; require: exit 3 if nothing can be restored."),
    Setting("CKPT_SIGNAL", "SIGTERM", _signal, "The signal that means: checkpoint, then exit."),
    Setting("CKPT_TCP", "close", _choice("close", "established"),
            "close: established TCP connections are dropped on restore (listening sockets are "
            "kept); established: CRIU carries them (needs the peer to survive too)."),
    Setting("CKPT_LOG_LEVEL", "info", _choice("debug", "info", "warning", "error"),
            "Verbosity of the supervisor's own log lines."),
    Setting("CKPT_KEEP", "2", _KEEP, "How many complete generations to keep."),
    Setting("CKPT_CRIU_LOG_LEVEL", "4", _choice("0", "1", "2", "3", "4"),
            "CRIU's own log verbosity (4 is the most detailed)."),
    Setting("CKPT_LEASE_INTERVAL", "5", _LEASE_INTERVAL,
            "Seconds between heartbeats of the running instance's lease on its lineage."),
    Setting("CKPT_LEASE_TIMEOUT", "30", _LEASE_TIMEOUT,
            "Seconds without a heartbeat after which a lease is taken over (its holder died); at least twice "
            "CKPT_LEASE_INTERVAL."),
    Setting("CKPT_HANDOFF_TIMEOUT", "300", _HANDOFF_TIMEOUT,
            "Seconds a new instance waits for the live lease holder's final checkpoint before exiting 5."),
    Setting("CKPT_SIGNING_KEY_FILE", "", _optional_path,
            "A file (e.g. a Docker/Kubernetes secret) with the HMAC-SHA256 key that signs manifests; "
            "restore then refuses unsigned or wrongly signed generations."),
    Setting("CKPT_STATE_PATHS", "", _path_list,
            "Extra paths in the container's writable layer to carry inside each checkpoint, ':'-separated: "
            "everything under them, changed or not. Mostly redundant since the whole writable layer is carried "
            "(docs/writable-layer.md); still what is carried, with the app's open files, where the layer is not "
            "recorded (the supervisor is not the container's init)."),
    Setting("CKPT_CARRY_EXCLUDE", "", _exclude_list,
            "Paths of the writable layer never carried, ':'-separated (e.g. a cache the app rebuilds): nothing at "
            "or beneath them is carried or deleted, so the replacement keeps its image's copy. Never carried "
            "anyway: CKPT_DIR and other mounts, /proc, /sys, /dev, /run/secrets, the engine's files, the "
            "supervisor's and CRIU's own."),
    Setting("CKPT_TRIGGERS", "sigterm,control,file,auto", _triggers,
            "What asks for checkpoints: sigterm (CKPT_SIGNAL), control (the socket behind `criu-supervisor "
            "checkpoint`), file (a checkpoint-request file on the volume), periodic (CKPT_INTERVAL), aws, gcp, "
            "azure (spot/preemption notices), auto (the cloud detected at start, if any)."),
    Setting("CKPT_INTERVAL", "0", _INTERVAL,
            "Seconds between periodic leave-running checkpoints (0: off). The safety net for a machine that "
            "dies with no notice."),
    Setting("CKPT_DEADLINE_MARGIN", "30", _DEADLINE_MARGIN,
            "With a long notice (AWS, 2 min) the final checkpoint starts this many seconds before the deadline."),
    Setting("CKPT_POLL_INTERVAL", "5", _POLL_INTERVAL,
            "Seconds between polls of AWS's metadata service (AWS recommends 5); GCP and Azure, with 30 s "
            "notices, are polled at least every second."),
    Setting("CKPT_AWS_METADATA_URL", "http://169.254.169.254", _url, "Base URL of the AWS instance metadata service."),
    Setting("CKPT_GCP_METADATA_URL", "http://169.254.169.254", _url,
            "Base URL of the GCP metadata server (the IP of metadata.google.internal: no DNS lookup to hang on)."),
    Setting("CKPT_AZURE_METADATA_URL", "http://169.254.169.254", _url,
            "Base URL of Azure's instance metadata service."),
    Setting("CKPT_CONTROL_SOCKET", "/run/criu-supervisor.sock", _socket_path,
            "The local control socket used by `criu-supervisor checkpoint` and `status`: created only where nothing "
            "exists or over a dead socket (a file, a link, a directory or a live socket there is refused); a "
            "missing directory is created 0700. At most 107 bytes, not under /proc, /sys, /dev or CKPT_DIR."),
    Setting("CKPT_COMPRESS", "none", _choice("none", "zstd", "lz4"),
            "Compress page images on their way to the volume (CRIU dumps to local scratch space, the pages are "
            "streamed compressed to the volume while CRIU writes): fewer bytes on slow network volumes."),
    Setting("CKPT_LAZY", "off", _choice("off", "on", "auto"),
            "off: every byte of a checkpoint is verified before the app runs. on: restore lazily (pages fetched on "
            "first touch by CRIU's lazy-pages daemon): the app answers in ~0.1 s whatever its size, but its page "
            "images are verified in the background, after it runs (a mismatch kills it, exit 7). auto: lazily when "
            "the pages exceed 256 MiB and no CKPT_SIGNING_KEY_FILE is set."),
    Setting("CKPT_IO_URING", "deny", _choice("deny", "allow"),
            "deny: the app's io_uring_setup() fails with ENOSYS, so runtimes (libuv, Node.js) fall back to epoll "
            "before opening a ring, which CRIU cannot dump; allow: io_uring works, checkpoints of apps using it fail."),
    Setting("CKPT_MPTCP", "deny", _choice("deny", "allow"),
            "deny: the app's socket() calls asking for Multipath TCP (IPPROTO_MPTCP) fail with EPROTONOSUPPORT, as "
            "on a kernel without MPTCP, so runtimes (Go >= 1.24 listeners) use plain TCP, which CRIU can dump; "
            "allow: MPTCP works, checkpoints of apps holding an MPTCP socket fail (the log line says so)."),
    Setting("CKPT_SHARE_IPC", "0", _toggle,
            "1: the app shares the container's IPC namespace (SysV shared memory with a sidecar), which CRIU then "
            "cannot carry; 0: the app gets its own, carried with it."),
    Setting("CKPT_OWN_PROC", "0", _toggle,
            "1: the app gets its own mount namespace with a /proc of its own PID namespace, so files it opens "
            "under /proc/<pid>/ name the PIDs CRIU restores (they fail to restore otherwise). Docker's masks "
            "over /proc (kcore, keys, read-only sys...) are not re-applied inside it."),
    Setting("CKPT_CPU_BASELINE", "native", _choice("native", "x86-64-v2", "x86-64-v3", "x86-64-v4"),
            "native: the app uses what this CPU has, and its checkpoints restore on CPUs with at least those "
            "features; x86-64-v2/v3/v4: a fresh app's glibc is kept to that level (GLIBC_TUNABLES, in the app's "
            "environment only), so its checkpoints restore on every CPU of that level or above (see docs/cpu.md "
            "for what a baseline cannot bound)."),
    Setting("CKPT_PORTABLE_CAPS", "0", _toggle,
            "1: the app is started with only the capabilities every replacement has: every engine's default set "
            "(Podman's: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, NET_BIND_SERVICE, SETFCAP, SETGID, SETPCAP, "
            "SETUID, SYS_CHROOT) plus the four CRIU needs (SYS_ADMIN, SYS_PTRACE, SYS_TIME, NET_ADMIN), so that it "
            "restores under Docker, Podman and containerd defaults alike (it loses e.g. NET_RAW: no ping); 0: it "
            "has the container's."),
    Setting("CKPT_METRICS_PORT", "0", _PORT,
            "Serve Prometheus metrics at http://CKPT_METRICS_ADDRESS:PORT/metrics (0: off). Not one of the app's "
            "own ports: one it listened on at its last checkpoint, or one in use, is refused."),
    Setting("CKPT_METRICS_ADDRESS", "0.0.0.0", _ip_address,
            "The IPv4 or IPv6 address metrics are served on: 0.0.0.0 (every IPv4 address, so that Prometheus can "
            "scrape the pod, as exporters do), :: (every address), 127.0.0.1 (this container only)."),
    Setting("CKPT_CANNOT_RESTORE", "exit", _choice("exit", "fresh"),
            "When this container cannot restore the newest checkpoint although nothing is wrong with it (a missing "
            "capability, a seccomp filter, another CPU, an older CRIU, no terminal): exit: exit 6 naming the cause "
            "and the fix, and leave the checkpoint for a replacement that can; fresh: start the app fresh (the "
            "checkpoint is kept, not condemned, until newer ones replace it)."),
    Setting("CKPT_ROLLBACK", "allow", _choice("allow", "refuse"),
            "When the instance that restored the newest checkpoint died without a newer one: allow: restore it "
            "again (the work done since it is lost, and logged); refuse: start fresh, for apps that must never "
            "repeat work."),
    Setting("CKPT_RESTORE_STALL", "30", _RESTORE_STALL,
            "Seconds a restore may go without progress (CRIU's log and reads not growing) before it is killed and "
            "this container is judged unable to restore (exit 6, the checkpoint kept)."),
    Setting("CKPT_APP_VERSION", "", _optional_text,
            "Optional: a version of the app (e.g. the image tag or digest, from the deployment). Recorded in every "
            "checkpoint; a checkpoint of another version is not restored (the app starts fresh)."),
    Setting("CKPT_AFTER_NOTICE", "idle", _choice("idle", "exit"),
            "After the final checkpoint for a cloud notice: idle (stay up without the app, so a restart policy "
            "cannot restore it on the doomed machine) or exit 0."),
)


@dataclasses.dataclass(frozen=True)
class Config:
    dir: str
    name: str
    restore: str
    signal: signal.Signals
    tcp: str
    log_level: str
    keep: int
    criu_log_level: str
    lease_interval: float
    lease_timeout: float
    handoff_timeout: float
    signing_key_file: str | None
    state_paths: tuple[str, ...]
    carry_exclude: tuple[str, ...]
    triggers: tuple[str, ...]
    interval: float
    deadline_margin: float
    poll_interval: float
    aws_metadata_url: str
    gcp_metadata_url: str
    azure_metadata_url: str
    control_socket: str
    compress: str
    lazy: str
    io_uring: str
    mptcp: str
    share_ipc: bool
    own_proc: bool
    cpu_baseline: str
    portable_caps: bool
    metrics_port: int
    metrics_address: str
    cannot_restore: str
    rollback: str
    restore_stall: float
    app_version: str | None
    after_notice: str

    @property
    def lineage_dir(self) -> str:
        return f"{self.dir}/{self.name}"


def load(environ: Mapping[str, str], flags: Mapping[str, str | None] | None = None) -> Config:
    """Build a Config from the environment, with flags (by field name) taking precedence."""
    flags = flags or {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = flags.get(setting.field)
        source = setting.flag
        if raw is None:
            raw = environ.get(setting.variable)
            source = setting.variable
        if raw is None or (raw == "" and setting.default != ""):
            raw, source = setting.default, setting.variable
        label = f"{setting.flag} ({setting.variable})" if source.startswith("--") else setting.variable
        values[setting.field] = setting.parse(label, raw)
    if values["lease_timeout"] < 2 * values["lease_interval"]:
        raise ConfigError(
            f"CKPT_LEASE_TIMEOUT={values['lease_timeout']:g} is not valid: it must be at least twice "
            f"CKPT_LEASE_INTERVAL ({values['lease_interval']:g}), or a slow beat looks like a dead holder"
        )
    if "periodic" in values["triggers"] and values["interval"] <= 0:
        raise ConfigError("CKPT_TRIGGERS includes periodic but CKPT_INTERVAL is 0: set CKPT_INTERVAL to the seconds "
                          "between checkpoints")
    if values["dir"] != "/" and values["control_socket"].startswith(values["dir"] + "/"):
        # On a shared volume another host's live socket looks dead from here (connect() is refused: unix
        # sockets are local to a kernel) and would be replaced.
        raise ConfigError(f"CKPT_CONTROL_SOCKET={values['control_socket']!r} is not valid: it is inside CKPT_DIR "
                          f"({values['dir']}), the shared volume: use a path in the container, e.g. "
                          "/run/criu-supervisor.sock")
    return Config(**values)


# CKPT_* variables the package reads that are not settings (no flag twin, no parsing): the manifest records
# them as the source of a checkpoint (store.py). Keep this in step with `grep -rn environ supervisor_pkg`.
NOT_SETTINGS = frozenset({
    "CKPT_HOST_NAME",  # the node's name, e.g. from the Kubernetes downward API (store.py)
    "CKPT_IMAGE_ID",  # the app image's digest, from the deployment (store.py)
})
_MAX_WARNINGS = 20


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning line per CKPT_* variable that nothing reads (a typo, or a setting of another version)."""
    known = [setting.variable for setting in SETTINGS] + sorted(NOT_SETTINGS)
    unknown = sorted(name for name in environ if name.upper().startswith("CKPT_") and name not in known)
    if not unknown:
        return []
    import difflib  # ~1 ms of start-up, paid only when there is something to warn about

    warnings = []
    for name in unknown[:_MAX_WARNINGS]:
        shown = name if name.isprintable() else repr(name)
        close = difflib.get_close_matches(name.upper(), known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else " (the settings are listed in the README)"
        warnings.append(f"{shown} is not a criu-supervisor setting{hint}; it is ignored")
    if len(unknown) > _MAX_WARNINGS:
        warnings.append(f"... and {len(unknown) - _MAX_WARNINGS} more CKPT_* variables that are not settings")
    return warnings


def describe_table() -> str:
    """The settings as a Markdown table (used to keep the README honest)."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(f"| `{s.variable}` | `{s.flag}` | `{s.default}` | {s.help} |")
    return "\n".join(rows)
