#!/usr/bin/env python3
"""Migration benchmark: criu-supervisor versus bare CRIU versus dd, in one run.

    python3 benchmarks/migration.py --sizes 256,1024 [--repeats 3] [--markdown OUT.md]

For each size N (MiB), the kv example holds N MiB of random, incompressible
memory (KV_BALLAST_MIB=N). Every repeat ("trial") gets a fresh named volume at
/checkpoints and measures, on that volume:

supervisor
    checkpoint: host clock from `docker stop -t 120 A` (SIGTERM to the
        supervisor) until the container has exited (`docker stop` returns once
        it has; `docker wait` then confirms exit code 0). The supervisor's own
        CRIU dump time is read from the manifest (stats.dump_seconds), so the
        rest (hashing, fsync, publication, container teardown) can be seen.
    restore: from just before `docker run` of B until the app answers
        /health. B runs the image's own ENTRYPOINT+CMD, but through
        `sh -c 'POLLER & exec ENTRYPOINT CMD'`: the supervisor is still PID 1,
        and a poller started in the same instant probes /health every 10 ms
        from inside and prints the wall-clock time of the first answer. So
        neither docker exec's latency (reported separately) nor the host's
        polling is counted. Containers share the host's CLOCK_REALTIME (time
        namespaces only shift the monotonic and boot-time clocks), so the
        host's start stamp and the poller's stamp are comparable. The poller
        also reads /stats: a trial in which B started the app fresh instead of
        restoring it (its start time changed) fails. Should the very first
        probe already be answered, the figure is flagged with '*'.
bare CRIU
    The same app in a container whose entrypoint is `sleep infinity`, started
    with `docker exec` as `unshare --pid --fork --ipc setsid python3 -u
    /app/kv.py` (setsid: CRIU refuses a session leader outside the PID
    namespace) with stdio on /dev/null, so no --inherit-fd is needed.
    dump: `criu dump -t <namespace init> -D /checkpoints/bare --tcp-close`,
        timed inside the container with `date`, so docker exec's latency is not
        counted; then `sync FILES` of the images, timed on its own, because
        CRIU does not fsync and the supervisor does.
    restore: a new container whose entrypoint starts the same poller, runs
        `criu restore -d -D /checkpoints/bare --tcp-close`, then `sleep
        infinity`; measured exactly like the supervisor's restore (docker run
        -> /health), plus the CRIU command alone as timed inside.
dd
    `dd if=/dev/zero of=/checkpoints/dd.bin bs=4M count=N/4 conv=fsync` in a
    running helper container, timed inside: what writing N MiB durably to
    this volume costs.
docker floors
    `docker exec C true` round trip; `docker stop` of a container whose PID 1
    exits at once on SIGTERM; `docker run -d` until its entrypoint runs. These
    are the parts of the supervisor figures that no checkpoint tool can avoid.

The order of the three phases rotates from one repeat to the next, so that a
slow phase does not always warm (or pollute) the page cache for the same next
phase.

Caveats. The machine this was written on has 2 noisy cores shared with other
work: quote medians and ratios measured in the same run, never absolute times
from different runs. Ratios are the median of the per-trial ratios (each
trial's numbers were taken within a minute on the same volume). The steadiest
figures are the paired ones: the supervisor's time minus its own CRIU call,
measured in the same container. Writing a GiB into the page cache costs from
0.2 to 3 s here, depending on whether the VM's memory pages are still backed
by the hypervisor (virtio-balloon free page reporting is on), so single dump
times at 1 GiB scatter widely. Restores read images that were just written,
mostly from the page cache: they show CPU and copying costs, not a cold read
from a remote volume (NFS/EFS would add its read throughput). The named volume
is a directory on the host's disk, standing in for a shared volume.

Uses only the standard library and the `docker` CLI. Every container and
volume it creates is named bench-<pid>-... and removed at the end, also on
failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

APP_IMAGE = "criu-supervisor-example-kv:latest"
SUPERVISOR_IMAGE = "criu-supervisor:latest"
CHECKPOINTS = "/checkpoints"
BARE_IMAGES = f"{CHECKPOINTS}/bare"
# The supervisor's lineage under the default CKPT_NAME (see supervisor_pkg/store.py).
SUPERVISOR_LINEAGE = f"{CHECKPOINTS}/default"
# What CRIU needs on this machine (/work/shared/ENVIRONMENT.md); --network none keeps traffic on loopback.
CRIU_RUN_OPTIONS = (
    "--cap-add", "SYS_ADMIN", "--cap-add", "SYS_PTRACE", "--cap-add", "SYS_TIME", "--cap-add", "NET_ADMIN",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--network", "none",
)
STOP_TIMEOUT_SECONDS = 120
APP_START_TIMEOUT_SECONDS = 300.0
RESTORE_TIMEOUT_SECONDS = 300.0
FLOOR_SAMPLES = 5

# Runs inside a container (python3 -c CODE TIMEOUT INTERVAL): wait for /health, print when it first answered.
HEALTH_POLLER = r"""
import http.client, json, sys, time, urllib.request
deadline = time.time() + float(sys.argv[1])
poll_interval = float(sys.argv[2])
started = time.time()
probes = 0
while True:
    probes += 1
    try:
        with urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=5) as reply:
            if reply.status == 200:
                break
    except (OSError, http.client.HTTPException):
        pass
    if time.time() > deadline:
        print("bench-health", json.dumps({"error": "no answer from /health", "probes": probes}), flush=True)
        sys.exit(1)
    time.sleep(poll_interval)
healthy = time.time()
with urllib.request.urlopen("http://127.0.0.1:8080/stats", timeout=5) as reply:
    app_started = json.load(reply)["started"]
report = {"poller_started": started, "healthy": healthy, "probes": probes, "app_started": app_started}
print("bench-health", json.dumps(report), flush=True)
"""
POLL_INTERVAL_SECONDS = 0.01

# Runs inside a container (python3 -c): the PID, in the container's namespace, of the init of a nested PID namespace.
FIND_NAMESPACE_INIT = r"""
import glob, re
for status in glob.glob("/proc/[0-9]*/status"):
    try:
        text = open(status).read()
        cmdline = open(status.replace("status", "cmdline"), "rb").read()
    except OSError:
        continue
    pids = re.search(r"^NSpid:\s*(.*)$", text, re.MULTILINE).group(1).split()
    if len(pids) == 2 and pids[-1] == "1" and b"kv.py" in cmdline:
        print(pids[0])
"""

# Runs inside a container (python3 -c): sizes of the supervisor's newest generation and of the bare images.
MEASURE_IMAGES = r"""
import json, os, sys
lineage, bare = sys.argv[1], sys.argv[2]
result = {}
try:
    newest = open(os.path.join(lineage, "latest")).read().strip()
    manifest = json.load(open(os.path.join(lineage, newest, "manifest.json")))
    result["supervisor_bytes"] = sum(entry["size"] for entry in manifest["files"].values())
    result["supervisor_dump_seconds"] = manifest.get("stats", {}).get("dump_seconds")
except (OSError, ValueError, KeyError):
    pass
if os.path.isdir(bare):
    result["bare_bytes"] = sum(entry.stat().st_size for entry in os.scandir(bare) if entry.is_file())
print(json.dumps(result))
"""

# The times a shell step prints about itself: "<marker> <exit code> <stamp> <stamp>...", stamps from `date +%s.%N`.
STAMP = "$(date +%s.%N)"


class BenchmarkError(Exception):
    """A step failed; the message says which and shows what docker or CRIU said."""


# --- docker, with bookkeeping so that everything is removed -----------------------------------


class Docker:
    """Runs the docker CLI and remembers every container and volume it created."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.containers: list[str] = []
        self.volumes: list[str] = []

    def run(self, *args: str, timeout: float = 600.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as error:
            raise BenchmarkError(f"`docker {shlex.join(args)}` did not finish in {timeout:.0f} s") from error
        if check and result.returncode != 0:
            raise BenchmarkError(
                f"`docker {shlex.join(args)}` exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def name(self, role: str) -> str:
        return f"{self.prefix}{role}"

    def create_volume(self, role: str) -> str:
        volume = self.name(role)
        self.volumes.append(volume)
        self.run("volume", "create", volume)
        return volume

    def start(self, role: str, volume: str, image: str, *options: str, command: Sequence[str] = ()) -> str:
        """`docker run -d` a container named after `role`, with `volume` at /checkpoints."""
        container = self.name(role)
        self.containers.append(container)  # before running: a failed run can still leave a container
        self.run("run", "-d", "--name", container, "-v", f"{volume}:{CHECKPOINTS}", *options, image, *command)
        return container

    def exec(self, container: str, *command: str, timeout: float = 600.0) -> str:
        return self.run("exec", container, *command, timeout=timeout).stdout

    def logs(self, container: str) -> str:
        result = self.run("logs", container, check=False)
        return result.stdout + result.stderr

    def is_running(self, container: str) -> bool:
        result = self.run("inspect", "--format", "{{.State.Running}}", container, check=False)
        return result.stdout.strip() == "true"

    def log_tail(self, container: str, lines: int = 25) -> str:
        return "\n".join(self.logs(container).splitlines()[-lines:])

    def remove(self, container: str) -> None:
        self.run("rm", "-f", "-v", container, check=False)
        if container in self.containers:
            self.containers.remove(container)

    def remove_volume(self, volume: str) -> None:
        self.run("volume", "rm", "-f", volume, check=False)
        if volume in self.volumes:
            self.volumes.remove(volume)

    def cleanup(self) -> None:
        """Remove everything we created (containers first: a volume in use cannot go)."""
        for container in list(self.containers):
            self.remove(container)
        leftovers = self.run("ps", "-aq", "--filter", f"name=^{self.prefix}", check=False).stdout.split()
        for container_id in leftovers:
            self.run("rm", "-f", "-v", container_id, check=False)
        for volume in list(self.volumes):
            self.remove_volume(volume)


# --- measurements shared by the phases -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Health:
    """When the app first answered /health (wall clock, seconds since the epoch)."""

    healthy_at: float
    poller_started: float  # when the first probe went out
    first_probe_answered: bool
    app_started: float  # the app's own start time, from /stats: survives a restore

    def upper_bound(self, resumed_at: float | None) -> bool:
        """True if the app may have been answering before the poller looked.

        A probe sent while CRIU is still restoring waits in the restored
        listening socket's backlog and is answered the moment the app runs, so
        a first-probe answer is exact if that probe went out before the app
        resumed. When the resume time is unknown, any first-probe answer counts.
        """
        if not self.first_probe_answered:
            return False
        return resumed_at is None or self.poller_started >= resumed_at


def parse_health(container: str, output: str) -> Health:
    """Read the poller's 'bench-health {...}' line."""
    match = re.search(r"^bench-health (\{.*\})\s*$", output, re.MULTILINE)
    report = json.loads(match.group(1)) if match else {"error": "the poller printed nothing"}
    if "error" in report:
        raise BenchmarkError(f"{container}: the app never answered /health ({report['error']}); its log ends:\n{output[-2000:]}")
    return Health(
        healthy_at=float(report["healthy"]),
        poller_started=float(report["poller_started"]),
        first_probe_answered=int(report["probes"]) == 1,
        app_started=float(report["app_started"]),
    )


def wait_for_health(docker: Docker, container: str, timeout: float) -> Health:
    """Poll /health from a process exec'd into `container` (for an app that is starting, not timed)."""
    result = docker.run(
        "exec", container, "python3", "-c", HEALTH_POLLER, str(timeout), str(POLL_INTERVAL_SECONDS),
        timeout=timeout + 60, check=False,
    )
    return parse_health(container, result.stdout + "\n" + docker.log_tail(container))


def with_health_poller(command: Sequence[str], timeout: float) -> list[str]:
    """`sh -c` arguments that start the poller, then exec `command` as the container's PID 1."""
    script = f'python3 -c "$1" {timeout} {POLL_INTERVAL_SECONDS} & exec {shlex.join(command)}'
    return ["-c", script, "sh", HEALTH_POLLER]


def wait_for_poller(docker: Docker, container: str, timeout: float) -> Health:
    """Wait for the poller started by with_health_poller to report in the container's log."""
    deadline = time.monotonic() + timeout + 30
    while time.monotonic() < deadline:
        output = docker.logs(container)
        if "bench-health" in output:
            return parse_health(container, output)
        if not docker.is_running(container):  # a failed restore: say so now, not after the timeout
            raise BenchmarkError(f"{container} exited before the app answered; its log ends:\n{docker.log_tail(container)}")
        time.sleep(0.05)
    raise BenchmarkError(f"{container}: the health poller never reported; its log ends:\n{docker.log_tail(container)}")


def image_command(docker: Docker, image: str) -> list[str]:
    """The image's ENTRYPOINT + CMD, i.e. what `docker run IMAGE` executes."""
    config = json.loads(docker.run("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    return [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]


def check_restored(container: str, before: Health, after: Health) -> None:
    """A restore that silently fell back to a fresh start must not be timed as a restore."""
    if abs(after.app_started - before.app_started) > 1e-6:
        raise BenchmarkError(f"{container} started the app fresh instead of restoring it (its start time changed)")


def parse_stamps(output: str, marker: str, count: int) -> tuple[int, list[float]]:
    """Find '<marker> <exit code> <stamp>...' in a step's output."""
    match = re.search(rf"^{marker} (-?\d+)((?: [\d.]+){{{count}}})\s*$", output, re.MULTILINE)
    if not match:
        raise BenchmarkError(f"no '{marker}' timing line in:\n{output[-2000:]}")
    return int(match.group(1)), [float(stamp) for stamp in match.group(2).split()]


def dd_arguments(size_mib: int) -> str:
    """bs=4M count=N/4 as asked for; 1 MiB blocks when N is not a multiple of 4."""
    if size_mib % 4 == 0:
        return f"bs=4M count={size_mib // 4}"
    return f"bs=1M count={size_mib}"


def measure_images(docker: Docker, helper: str) -> dict[str, Any]:
    return dict(json.loads(docker.exec(helper, "python3", "-c", MEASURE_IMAGES, SUPERVISOR_LINEAGE, BARE_IMAGES)))


def match_seconds(pattern: str, text: str) -> float | None:
    """A duration the supervisor logged about itself, if its log still words it this way."""
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


# --- one trial: the phases ------------------------------------------------------------------------


@dataclasses.dataclass
class Trial:
    """Everything measured for one size in one repeat (seconds and bytes)."""

    size_mib: int
    repeat: int
    order: list[str] = dataclasses.field(default_factory=list)
    supervisor_checkpoint: float = float("nan")
    supervisor_criu_dump: float | None = None
    supervisor_published: float | None = None
    supervisor_bytes: int = 0
    supervisor_restore: float = float("nan")
    supervisor_restore_upper_bound: bool = False
    supervisor_criu_restore: float | None = None
    bare_dump: float = float("nan")
    bare_fsync: float = float("nan")
    bare_bytes: int = 0
    bare_restore: float = float("nan")
    bare_restore_upper_bound: bool = False
    bare_criu_restore: float = float("nan")
    dd: float = float("nan")
    docker_exec: float = float("nan")
    docker_stop_floor: float = float("nan")
    docker_start_floor: float = float("nan")


class TrialRunner:
    """Runs the phases of one trial on one fresh volume."""

    def __init__(self, docker: Docker, trial: Trial, label: str) -> None:
        self.docker = docker
        self.trial = trial
        self.label = label
        self.ballast = ("-e", f"KV_BALLAST_MIB={trial.size_mib}")
        self.volume = ""
        self.helper = ""

    def run(self) -> Trial:
        self.volume = self.docker.create_volume(f"{self.label}-vol")
        self.helper = self.docker.start(
            f"{self.label}-helper", self.volume, APP_IMAGE, "--network", "none", "--entrypoint", "sleep",
            command=["infinity"],
        )
        phases: dict[str, Callable[[], None]] = {"supervisor": self.supervisor, "bare": self.bare, "dd": self.dd}
        names = list(phases)
        shift = self.trial.repeat % len(names)
        self.trial.order = names[shift:] + names[:shift]
        for name in self.trial.order:
            phases[name]()
        self.measure_sizes()
        self.docker_floors()
        self.docker.remove(self.helper)
        self.docker.remove_volume(self.volume)
        return self.trial

    def supervisor(self) -> None:
        """Checkpoint by `docker stop`, restore by `docker run`, as a user would."""
        source = self.docker.start(f"{self.label}-sup-a", self.volume, APP_IMAGE, *CRIU_RUN_OPTIONS, *self.ballast)
        before = wait_for_health(self.docker, source, APP_START_TIMEOUT_SECONDS)
        started = time.monotonic()
        self.docker.run("stop", "-t", str(STOP_TIMEOUT_SECONDS), source, timeout=STOP_TIMEOUT_SECONDS + 60)
        exit_code = self.docker.run("wait", source).stdout.strip()
        self.trial.supervisor_checkpoint = time.monotonic() - started
        source_log = self.docker.logs(source)
        if exit_code != "0":
            raise BenchmarkError(f"{source} exited {exit_code}, not 0 (no checkpoint?); its log ends:\n{source_log[-2000:]}")
        self.trial.supervisor_published = match_seconds(r"published in ([\d.]+) s", source_log)
        self.docker.remove(source)

        run_at = time.time()
        target = self.docker.start(
            f"{self.label}-sup-b", self.volume, APP_IMAGE, *CRIU_RUN_OPTIONS, *self.ballast, "--entrypoint", "sh",
            command=with_health_poller(image_command(self.docker, APP_IMAGE), RESTORE_TIMEOUT_SECONDS),
        )
        after = wait_for_poller(self.docker, target, RESTORE_TIMEOUT_SECONDS)
        check_restored(target, before, after)
        self.trial.supervisor_restore = after.healthy_at - run_at
        self.trial.supervisor_restore_upper_bound = after.upper_bound(resumed_at=None)
        self.trial.supervisor_criu_restore = match_seconds(r"restored gen-\d+ .* in ([\d.]+) s", self.docker.logs(target))
        self.docker.remove(target)

    def bare(self) -> None:
        """The same app and volume with plain `criu dump` / `criu restore`, nothing around them."""
        source = self.docker.start(
            f"{self.label}-bare-a", self.volume, APP_IMAGE, *CRIU_RUN_OPTIONS, *self.ballast,
            "--entrypoint", "sleep", command=["infinity"],
        )
        self.docker.run(
            "exec", "-d", source, "sh", "-c",
            "exec unshare --pid --fork --ipc setsid python3 -u /app/kv.py </dev/null >/dev/null 2>&1",
        )
        before = wait_for_health(self.docker, source, APP_START_TIMEOUT_SECONDS)
        init_pid = self.docker.exec(source, "python3", "-c", FIND_NAMESPACE_INIT).strip()
        if not init_pid.isdigit():
            raise BenchmarkError(f"{source}: cannot find the app's namespace init (got {init_pid!r})")
        dump_script = (
            f"mkdir -p {BARE_IMAGES}; a={STAMP}; "
            f"criu dump -t {init_pid} -D {BARE_IMAGES} --tcp-close -o /tmp/dump.log; code=$?; b={STAMP}; "
            f"sync {BARE_IMAGES}/*; c={STAMP}; "
            'echo "bench-dump $code $a $b $c"; [ $code = 0 ] || tail -n 20 /tmp/dump.log'
        )
        output = self.docker.run("exec", source, "sh", "-c", dump_script, check=False).stdout
        code, (dump_started, dumped, synced) = parse_stamps(output, "bench-dump", 3)
        if code != 0:
            raise BenchmarkError(f"bare criu dump exited {code}:\n{output}")
        self.trial.bare_dump = dumped - dump_started
        self.trial.bare_fsync = synced - dumped
        self.docker.remove(source)

        restore_script = (
            f"a={STAMP}; criu restore -d -D {BARE_IMAGES} --tcp-close -o /tmp/restore.log; code=$?; b={STAMP}; "
            'echo "bench-restore $code $a $b"; [ $code = 0 ] || { tail -n 20 /tmp/restore.log; exit $code; }; '
            "exec sleep infinity"
        )
        run_at = time.time()
        target = self.docker.start(
            f"{self.label}-bare-b", self.volume, APP_IMAGE, *CRIU_RUN_OPTIONS, "--entrypoint", "sh",
            command=with_health_poller(["sh", "-c", restore_script], RESTORE_TIMEOUT_SECONDS),
        )
        after = wait_for_poller(self.docker, target, RESTORE_TIMEOUT_SECONDS)
        check_restored(target, before, after)
        code, (restore_started, restored) = parse_stamps(self.docker.logs(target), "bench-restore", 2)
        if code != 0:
            raise BenchmarkError(f"bare criu restore exited {code}:\n{self.docker.logs(target)}")
        self.trial.bare_criu_restore = restored - restore_started
        self.trial.bare_restore = after.healthy_at - run_at
        self.trial.bare_restore_upper_bound = after.upper_bound(resumed_at=restored)
        self.docker.remove(target)

    def dd(self) -> None:
        """Writing the same number of bytes durably to the same volume."""
        script = (
            f"a={STAMP}; dd if=/dev/zero of={CHECKPOINTS}/dd.bin {dd_arguments(self.trial.size_mib)} "
            f'conv=fsync status=none; code=$?; b={STAMP}; rm -f {CHECKPOINTS}/dd.bin; echo "bench-dd $code $a $b"'
        )
        output = self.docker.exec(self.helper, "sh", "-c", script)
        code, (started, finished) = parse_stamps(output, "bench-dd", 2)
        if code != 0:
            raise BenchmarkError(f"dd exited {code}:\n{output}")
        self.trial.dd = finished - started

    def measure_sizes(self) -> None:
        sizes = measure_images(self.docker, self.helper)
        self.trial.supervisor_bytes = int(sizes.get("supervisor_bytes", 0))
        self.trial.bare_bytes = int(sizes.get("bare_bytes", 0))
        dump_seconds = sizes.get("supervisor_dump_seconds")
        self.trial.supervisor_criu_dump = float(dump_seconds) if dump_seconds is not None else None

    def docker_floors(self) -> None:
        """What docker itself costs here, now: exec round trip, stop, start."""
        exec_times = []
        for _ in range(FLOOR_SAMPLES):
            started = time.monotonic()
            self.docker.exec(self.helper, "true")
            exec_times.append(time.monotonic() - started)
        self.trial.docker_exec = statistics.median(exec_times)

        # PID 1 with a SIGTERM handler that exits at once; it prints when it started running.
        quick_exit = (
            "import signal, sys, time; print('bench-start 0', repr(time.time()), flush=True); "
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); signal.pause()"
        )
        run_at = time.time()
        container = self.docker.start(
            f"{self.label}-floor", self.volume, APP_IMAGE, "--network", "none", "--entrypoint", "python3",
            command=["-c", quick_exit],
        )
        deadline = time.monotonic() + 30
        while "bench-start" not in (log := self.docker.logs(container)) and time.monotonic() < deadline:
            time.sleep(0.02)
        _, (entrypoint_at,) = parse_stamps(log, "bench-start", 1)
        self.trial.docker_start_floor = entrypoint_at - run_at
        started = time.monotonic()
        self.docker.run("stop", "-t", "30", container)
        self.trial.docker_stop_floor = time.monotonic() - started
        self.docker.remove(container)


# --- the report ------------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def minus(value: float | None, part: float | None) -> float | None:
    return None if value is None or part is None else value - part


def seconds(value: float | None, flagged: bool = False) -> str:
    return "n/a" if value is None else f"{value:.2f}{'*' if flagged else ''}"


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class Summary:
    """Per-size medians over the trials; ratios are medians of the per-trial ratios."""

    def __init__(self, trials: Sequence[Trial]) -> None:
        self.trials = trials
        self.sizes = sorted({trial.size_mib for trial in trials})

    def of(self, size: int) -> list[Trial]:
        return [trial for trial in self.trials if trial.size_mib == size]

    def median(self, size: int, get: Callable[[Trial], float | None]) -> float | None:
        return median([get(trial) for trial in self.of(size)])

    def flagged(self, size: int, get: Callable[[Trial], bool]) -> bool:
        return any(get(trial) for trial in self.of(size))

    def checkpoint_table(self) -> str:
        header = ["MiB held", "supervisor", "its CRIU dump", "its hash+fsync+publish", "docker stop+exit",
                  "bare dump", "bare dump+fsync", "dd fsync", "sup/bare", "sup/(bare+fsync)", "sup/dd",
                  "image MiB sup/bare"]
        rows = [
            [
                str(size),
                seconds(self.median(size, lambda t: t.supervisor_checkpoint)),
                seconds(self.median(size, lambda t: t.supervisor_criu_dump)),
                seconds(self.median(size, lambda t: minus(t.supervisor_published, t.supervisor_criu_dump))),
                seconds(self.median(size, lambda t: minus(t.supervisor_checkpoint, t.supervisor_published))),
                seconds(self.median(size, lambda t: t.bare_dump)),
                seconds(self.median(size, lambda t: t.bare_dump + t.bare_fsync)),
                seconds(self.median(size, lambda t: t.dd)),
                ratio(self.median(size, lambda t: t.supervisor_checkpoint / t.bare_dump)),
                ratio(self.median(size, lambda t: t.supervisor_checkpoint / (t.bare_dump + t.bare_fsync))),
                ratio(self.median(size, lambda t: t.supervisor_checkpoint / t.dd)),
                f"{mib(self.median(size, lambda t: t.supervisor_bytes))}/{mib(self.median(size, lambda t: t.bare_bytes))}",
            ]
            for size in self.sizes
        ]
        return table(header, rows)

    def restore_table(self) -> str:
        header = ["MiB held", "supervisor", "its CRIU restore", "sup minus its CRIU", "bare container",
                  "bare criu restore", "sup/bare container", "sup/bare criu"]
        rows = [
            [
                str(size),
                seconds(self.median(size, lambda t: t.supervisor_restore),
                        self.flagged(size, lambda t: t.supervisor_restore_upper_bound)),
                seconds(self.median(size, lambda t: t.supervisor_criu_restore)),
                seconds(self.median(size, lambda t: minus(t.supervisor_restore, t.supervisor_criu_restore))),
                seconds(self.median(size, lambda t: t.bare_restore),
                        self.flagged(size, lambda t: t.bare_restore_upper_bound)),
                seconds(self.median(size, lambda t: t.bare_criu_restore)),
                ratio(self.median(size, lambda t: t.supervisor_restore / t.bare_restore)),
                ratio(self.median(size, lambda t: t.supervisor_restore / t.bare_criu_restore)),
            ]
            for size in self.sizes
        ]
        return table(header, rows)

    def docker_table(self) -> str:
        header = ["MiB held", "docker exec round trip", "docker stop, instant exit", "docker run -> entrypoint runs"]
        rows = [
            [
                str(size),
                seconds(self.median(size, lambda t: t.docker_exec)),
                seconds(self.median(size, lambda t: t.docker_stop_floor)),
                seconds(self.median(size, lambda t: t.docker_start_floor)),
            ]
            for size in self.sizes
        ]
        return table(header, rows)

    @property
    def any_upper_bound(self) -> bool:
        return any(t.supervisor_restore_upper_bound or t.bare_restore_upper_bound for t in self.trials)


def report(trials: Sequence[Trial], environment: dict[str, str], command: str) -> str:
    summary = Summary(trials)
    repeats = max(len(summary.of(size)) for size in summary.sizes)
    parts = [
        f"Run: {environment['date']}, {environment['host']}",
        f"Command: `{command}`",
        f"Medians of {repeats} repeat(s) per size, in seconds unless noted; ratios are medians of per-trial ratios.",
        "",
        "Checkpoint. Supervisor: `docker stop` -> container exited 0 (host clock). Bare, dd: timed inside.",
        "",
        summary.checkpoint_table(),
        "",
        "Restore. Both containers: `docker run` -> /health answers. CRIU columns: the restore call alone.",
        "",
        summary.restore_table(),
        "",
        "Docker's own costs, measured in the same trials.",
        "",
        summary.docker_table(),
        "",
    ]
    if summary.any_upper_bound:
        parts += ["\\* in at least one trial the app already answered when the poller started: an upper bound.", ""]
    parts += [
        "Per trial (order of the phases in parentheses):",
        "",
        "```",
        *(trial_line(trial) for trial in trials),
        "```",
        "",
        f"Environment: {environment['details']}",
    ]
    return "\n".join(parts) + "\n"


def trial_line(trial: Trial) -> str:
    def flag(upper_bound: bool) -> str:
        return "*" if upper_bound else ""

    return (
        f"{trial.size_mib} MiB #{trial.repeat + 1} ({'/'.join(trial.order)}): "
        f"sup ckpt {trial.supervisor_checkpoint:.2f} (CRIU {seconds(trial.supervisor_criu_dump)}, "
        f"published {seconds(trial.supervisor_published)}) "
        f"restore {trial.supervisor_restore:.2f}{flag(trial.supervisor_restore_upper_bound)} "
        f"(CRIU {seconds(trial.supervisor_criu_restore)}) | "
        f"bare dump {trial.bare_dump:.2f}+fsync {trial.bare_fsync:.2f} "
        f"restore {trial.bare_restore:.2f}{flag(trial.bare_restore_upper_bound)} "
        f"(CRIU {trial.bare_criu_restore:.2f}) | dd {trial.dd:.2f}"
    )


def describe_environment(docker: Docker) -> dict[str, str]:
    server = docker.run("version", "--format", "{{.Server.Version}}", check=False).stdout.strip() or "unknown"
    criu = docker.run(
        "run", "--rm", "--network", "none", "--entrypoint", "criu", SUPERVISOR_IMAGE, "--version", check=False
    ).stdout
    criu_version = re.search(r"Version:\s*(\S+)", criu)
    # The images are rebuilt as the supervisor changes: say which build was measured.
    image_id, built = docker.run("image", "inspect", "--format", "{{.Id}} {{.Created}}", APP_IMAGE).stdout.split()[:2]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{os.cpu_count()} CPUs, kernel {platform.release()}",
        "details": (
            f"Docker engine {server}, CRIU {criu_version.group(1) if criu_version else 'unknown'}, "
            f"image {APP_IMAGE} ({image_id.removeprefix('sha256:')[:12]}, built {built[:19]}Z), "
            f"named volume (local driver) at {CHECKPOINTS}"
        ),
    }


# --- the command ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="256,1024", help="comma-separated MiB of app memory (default 256,1024)")
    parser.add_argument("--repeats", type=int, default=3, help="trials per size (default 3)")
    parser.add_argument("--markdown", metavar="OUT.md", help="also write the report to this file")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(part) for part in args.sizes.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--sizes={args.sizes!r}: expected comma-separated whole numbers of MiB")
    if not args.sizes or any(size < 1 for size in args.sizes):
        parser.error("--sizes: every size must be >= 1 MiB")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def check_images(docker: Docker) -> None:
    for image in (SUPERVISOR_IMAGE, APP_IMAGE):
        if docker.run("image", "inspect", image, check=False).returncode != 0:
            raise BenchmarkError(f"image {image} is missing: build it with scripts/bootstrap.sh")


def raise_interrupt(signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    command = "python3 benchmarks/migration.py " + shlex.join(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)  # so that `finally` cleans up on SIGTERM too
    docker = Docker(prefix=f"bench-{os.getpid()}-")
    trials: list[Trial] = []
    try:
        check_images(docker)
        environment = describe_environment(docker)
        for repeat in range(args.repeats):
            for size in args.sizes:
                trial = Trial(size_mib=size, repeat=repeat)
                TrialRunner(docker, trial, label=f"{size}m-r{repeat + 1}").run()
                trials.append(trial)
                print(trial_line(trial), file=sys.stderr, flush=True)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        docker.cleanup()
    text = report(trials, environment, command)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
