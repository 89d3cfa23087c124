"""Every setting: its environment variable, its flag twin, default and parser.

Settings come from the environment (Dockerfile ENV, compose `environment:`,
Kubernetes `env:`); a `run` flag of the same name overrides. The flag is the
variable without `CKPT_`, lower-cased, `_` -> `-` (CKPT_LOG_LEVEL -> --log-level).
Parsing is strict: a bad value raises ConfigError naming the variable and the
accepted values, which `cli` turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import re
import signal
from collections.abc import Callable, Mapping
from typing import Any

from supervisor_pkg.errors import ConfigError

# Signals that make sense as the checkpoint signal: catchable, and not the
# ones the supervisor needs for itself (SIGCHLD for reaping).
_CHECKPOINT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPWR")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _choice(*accepted: str) -> Callable[[str, str], str]:
    def parse(variable: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in accepted:
            raise ConfigError(f"{variable}={raw!r} is not valid: accepted values are {', '.join(accepted)}")
        return value

    return parse


def _signal(variable: str, raw: str) -> signal.Signals:
    name = raw.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name not in _CHECKPOINT_SIGNALS:
        raise ConfigError(
            f"{variable}={raw!r} is not valid: accepted values are {', '.join(_CHECKPOINT_SIGNALS)}"
        )
    return signal.Signals[name]


def _path(variable: str, raw: str) -> str:
    if not raw.startswith("/"):
        raise ConfigError(f"{variable}={raw!r} is not valid: it must be an absolute path")
    return raw.rstrip("/") or "/"


def _lineage_name(variable: str, raw: str) -> str:
    if not _NAME_PATTERN.fullmatch(raw):
        raise ConfigError(
            f"{variable}={raw!r} is not valid: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return raw


def _optional_path(variable: str, raw: str) -> str | None:
    if raw == "":
        return None
    return _path(variable, raw)


def _path_list(variable: str, raw: str) -> tuple[str, ...]:
    paths = tuple(part for part in raw.split(":") if part)
    for part in paths:
        if not part.startswith("/") or "/../" in part + "/":
            raise ConfigError(f"{variable}={raw!r} is not valid: expected absolute paths separated by ':'")
        if part.rstrip("/") == "" or (part.rstrip("/") + "/").startswith(("/proc/", "/sys/", "/dev/")):
            raise ConfigError(f"{variable}={raw!r} is not valid: {part} cannot be carried (/proc, /sys and /dev "
                              "are the kernel's, not the app's)")
    return tuple(part.rstrip("/") for part in paths)


TRIGGER_NAMES = ("sigterm", "control", "file", "periodic", "aws", "gcp", "azure", "auto")


def _triggers(variable: str, raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip().lower() for part in raw.split(",") if part.strip()))
    unknown = [name for name in names if name not in TRIGGER_NAMES]
    if unknown or not names:
        raise ConfigError(f"{variable}={raw!r} is not valid: use a comma-separated list of {', '.join(TRIGGER_NAMES)}")
    return names


def _url(variable: str, raw: str) -> str:
    if not re.match(r"^https?://[^\s/]+", raw):
        raise ConfigError(f"{variable}={raw!r} is not valid: expected an http:// or https:// URL")
    return raw.rstrip("/")


def _optional_text(variable: str, raw: str) -> str | None:
    if raw == "":
        return None
    if len(raw) > 200 or not raw.isprintable():
        raise ConfigError(f"{variable}={raw[:40]!r}... is not valid: use at most 200 printable characters")
    return raw


def _toggle(variable: str, raw: str) -> bool:
    if raw.strip() not in ("0", "1"):
        raise ConfigError(f"{variable}={raw!r} is not valid: accepted values are 0, 1")
    return raw.strip() == "1"


def _port(variable: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise ConfigError(f"{variable}={raw!r} is not valid: expected a TCP port 1-65535, or 0 for off")
    return value


def _positive_int(variable: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{variable}={raw!r} is not valid: expected a whole number >= 1")
    return value


def _seconds(variable: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{variable}={raw!r} is not valid: expected a number of seconds >= 0")
    return value


def _positive_seconds(variable: str, raw: str) -> float:
    value = _seconds(variable, raw)
    if value <= 0:
        raise ConfigError(f"{variable}={raw!r} is not valid: expected a number of seconds > 0")
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    variable: str
    default: str
    parse: Callable[[str, str], Any]
    help: str

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
    Setting("CKPT_KEEP", "2", _positive_int, "How many complete generations to keep."),
    Setting("CKPT_CRIU_LOG_LEVEL", "4", _choice("0", "1", "2", "3", "4"),
            "CRIU's own log verbosity (4 is the most detailed)."),
    Setting("CKPT_LEASE_INTERVAL", "5", _positive_seconds,
            "Seconds between heartbeats of the running instance's lease on its lineage."),
    Setting("CKPT_LEASE_TIMEOUT", "30", _positive_seconds,
            "Seconds without a heartbeat after which a lease is taken over (its holder died)."),
    Setting("CKPT_HANDOFF_TIMEOUT", "300", _seconds,
            "Seconds a new instance waits for the live lease holder's final checkpoint before exiting 5."),
    Setting("CKPT_SIGNING_KEY_FILE", "", _optional_path,
            "A file (e.g. a Docker/Kubernetes secret) with the HMAC-SHA256 key that signs manifests; "
            "restore then refuses unsigned or wrongly signed generations."),
    Setting("CKPT_STATE_PATHS", "", _path_list,
            "Extra paths in the container's writable layer to carry inside each checkpoint, ':'-separated."),
    Setting("CKPT_TRIGGERS", "sigterm,control,file,auto", _triggers,
            "What asks for checkpoints: sigterm (CKPT_SIGNAL), control (the socket behind `criu-supervisor "
            "checkpoint`), file (a checkpoint-request file on the volume), periodic (CKPT_INTERVAL), aws, gcp, "
            "azure (spot/preemption notices), auto (the cloud detected at start, if any)."),
    Setting("CKPT_INTERVAL", "0", _seconds,
            "Seconds between periodic leave-running checkpoints (0: off). The safety net for a machine that "
            "dies with no notice."),
    Setting("CKPT_DEADLINE_MARGIN", "30", _seconds,
            "With a long notice (AWS, 2 min) the final checkpoint starts this many seconds before the deadline."),
    Setting("CKPT_POLL_INTERVAL", "5", _positive_seconds,
            "Seconds between polls of AWS's metadata service (AWS recommends 5); GCP and Azure, with 30 s "
            "notices, are polled at least every second."),
    Setting("CKPT_AWS_METADATA_URL", "http://169.254.169.254", _url, "Base URL of the AWS instance metadata service."),
    Setting("CKPT_GCP_METADATA_URL", "http://169.254.169.254", _url,
            "Base URL of the GCP metadata server (the IP of metadata.google.internal: no DNS lookup to hang on)."),
    Setting("CKPT_AZURE_METADATA_URL", "http://169.254.169.254", _url,
            "Base URL of Azure's instance metadata service."),
    Setting("CKPT_CONTROL_SOCKET", "/run/criu-supervisor.sock", _path,
            "The local control socket used by `criu-supervisor checkpoint` and `status`."),
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
    Setting("CKPT_SHARE_IPC", "0", _toggle,
            "1: the app shares the container's IPC namespace (SysV shared memory with a sidecar), which CRIU then "
            "cannot carry; 0: the app gets its own, carried with it."),
    Setting("CKPT_OWN_PROC", "0", _toggle,
            "1: the app gets its own mount namespace with a /proc of its own PID namespace, so files it opens "
            "under /proc/<pid>/ name the PIDs CRIU restores (they fail to restore otherwise). Docker's masks "
            "over /proc (kcore, keys, read-only sys...) are not re-applied inside it."),
    Setting("CKPT_METRICS_PORT", "0", _port,
            "Serve Prometheus metrics at http://0.0.0.0:PORT/metrics (0: off)."),
    Setting("CKPT_CANNOT_RESTORE", "exit", _choice("exit", "fresh"),
            "When this container cannot restore the newest checkpoint although nothing is wrong with it (a missing "
            "capability, a seccomp filter, another CPU, an older CRIU, no terminal): exit: exit 6 naming the cause "
            "and the fix, and leave the checkpoint for a replacement that can; fresh: start the app fresh (the "
            "checkpoint is kept, not condemned, until newer ones replace it)."),
    Setting("CKPT_ROLLBACK", "allow", _choice("allow", "refuse"),
            "When the instance that restored the newest checkpoint died without a newer one: allow: restore it "
            "again (the work done since it is lost, and logged); refuse: start fresh, for apps that must never "
            "repeat work."),
    Setting("CKPT_RESTORE_STALL", "30", _positive_seconds,
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
    share_ipc: bool
    own_proc: bool
    metrics_port: int
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
    return Config(**values)


def describe_table() -> str:
    """The settings as a Markdown table (used to keep the README honest)."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(f"| `{s.variable}` | `{s.flag}` | `{s.default}` | {s.help} |")
    return "\n".join(rows)
