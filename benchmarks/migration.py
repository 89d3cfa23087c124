#!/usr/bin/env python3
"""Migration benchmark (issue 7): criu-supervisor versus bare CRIU versus dd, in one run.

    python3 benchmarks/migration.py [--sizes 64,256,1024,2048,4096] [--repeats 3]
                                    [--markdown OUT.md] [--json OUT.json]

For each size N (MiB), the kv example holds N MiB of random, incompressible
memory (KV_BALLAST_MIB=N). A size is skipped, with a note in the report, when
the host has too little memory or disk for it at that moment (see room_for):
4096 is in the default list, and runs only where the machine allows it.
Every repeat ("trial") gets a fresh named volume at /checkpoints and measures,
on that volume:

supervisor, checkpoint
    Container A runs the image as a user would (ENTRYPOINT + CMD, default
    triggers, CKPT_INTERVAL=0 so no periodic checkpoints). Once the app
    answers, the supervisor's idle memory (/proc/1/status VmRSS) is read
    from inside, and in each repeat's first trial its CPU (/proc/1/stat
    utime+stime over --idle-seconds; it idles alike whatever the app holds).
    Then `docker exec A sh -c 'date; kill -TERM 1'`: the clock starts at that
    stamp (the signal), so docker's latency is not counted. It stops at the
    docker log timestamp of the supervisor's "final checkpoint ... published"
    line: the generation is then fsynced, hashed, renamed into place and its
    parent fsynced, i.e. durable and verifiable. Also reported: signal until
    the container has exited (`docker wait`), the supervisor's own CRIU time
    (the manifest's stats.dump_seconds) and CRIU's frozen time, read from
    CRIU's stats-dump in the lineage's logs dir with pycriu.images.
supervisor, restore, full and lazy
    Container B restores A's generation with CKPT_LAZY=off or on, C the
    generation B left at its own checkpoint, with the other setting (the
    order rotates per repeat); B's checkpoint is timed like A's and shown per
    trial. B and C run the image's own ENTRYPOINT + CMD, but through
    `sh -c 'POLLER & exec ENTRYPOINT CMD'`: the supervisor is still PID 1, and
    a poller started in the same instant (it is handed the `date` of that
    instant) probes /health every 10 ms from inside and prints the wall-clock
    time of the first answer. "First answer" is that time minus the
    entrypoint's stamp: what docker itself costs to start a container is the
    same for every contestant and reported apart, and so is the figure from
    just before `docker run` (host clock; containers share CLOCK_REALTIME,
    time namespaces shift only the monotonic and boot-time clocks). The
    supervisor's log, with docker's timestamps, splits the first answer: its
    start-up and verification before CRIU (from "took the lease" to the start
    of the CRIU call, which the "restored ... in X s" line gives), and CRIU.
    For a lazy restore, "fully resident" is the docker timestamp of the "app
    fully resident: ... arrived and verified" line, from the entrypoint. The
    poller also reads /stats: a trial in which B or C started the app fresh
    instead of restoring it (its start time changed) fails, and so does one
    in which the supervisor restored fully when asked for lazy or back.
bare CRIU
    The same app in a container whose entrypoint is `sleep infinity`, started
    with `docker exec` as `unshare --pid --fork --ipc setsid python3 -u
    /app/kv.py` (setsid: CRIU refuses a session leader outside the PID
    namespace) with stdio on /dev/null, so no --inherit-fd is needed.
    dump: `criu dump -t <namespace init> -D /checkpoints/bare --tcp-close`,
        timed inside with `date`; then `sync FILES` of the images, timed on
        its own, because CRIU does not fsync and the supervisor does. CRIU's
        frozen time comes from the stats-dump it leaves in the images dir.
    restore, full: a new container whose entrypoint starts the same poller,
        runs `criu restore -d -D /checkpoints/bare --tcp-close`, then
        `sleep infinity`; measured like the supervisor's restores.
    restore, lazy: the same, but the entrypoint starts
        `criu lazy-pages -D /checkpoints/bare -W /tmp/w &`, waits for its
        socket, and runs `criu restore -D ... -W /tmp/w --lazy-pages -d`.
        "Fully resident" is when the lazy-pages daemon exits (it does once
        every page is in). The CRIU time includes starting the daemon, as the
        supervisor's does.
dd
    `dd if=/dev/zero of=/checkpoints/dd.bin bs=1M count=M conv=fsync` in a
    running helper container, timed inside, where M is the size of the
    checkpoint in MiB (from an earlier trial of the same size; N + 9 before
    the first): what writing those bytes durably to this volume costs.
docker floors
    `docker exec C true` round trip; `docker stop` of a container whose PID 1
    exits at once on SIGTERM; `docker run -d` until its entrypoint runs.

The order of the three phases (supervisor, bare, dd) and of the two restore
modes rotates from one repeat to the next, so that a slow phase does not
always warm (or pollute) the page cache for the same next phase.

Caveats. The machine this was written on has 2 noisy cores shared with other
work: quote medians and ratios measured in the same run, never absolute times
from different runs. Ratios are medians of per-trial ratios, and target
margins medians of per-trial margins (each trial's numbers were taken within
a minute or two on the same volume). Writing a GiB into the page cache costs
from 0.2 to 3 s here, depending on whether the VM's memory pages are still
backed by the hypervisor (virtio-balloon free page reporting is on), so single
dump times at 1 GiB and above scatter widely. Restores read images that were
just written, mostly from the page cache. The named volume is a directory on
the host's disk, standing in for a shared volume.

Uses only the standard library and the `docker` CLI (benchmarks/plot.py turns
--json output into a PNG and needs matplotlib). Every container and volume it
creates is named bench-<pid>-... and removed at the end, also on failure,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import shlex
import shutil
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
# The supervisor's lineage under the default CKPT_NAME, and where it keeps CRIU's logs and stats
# (supervisor_pkg/store.py; criu.dump() uses the logs dir as CRIU's work dir, where stats-dump lands).
SUPERVISOR_LINEAGE = f"{CHECKPOINTS}/default"
SUPERVISOR_STATS = f"{SUPERVISOR_LINEAGE}/logs/stats-dump"
BARE_STATS = f"{BARE_IMAGES}/stats-dump"  # bare CRIU's work dir defaults to its images dir
# What CRIU needs on this machine (/work/shared/ENVIRONMENT.md); --network none keeps traffic on loopback.
CRIU_RUN_OPTIONS = (
    "--cap-add", "SYS_ADMIN", "--cap-add", "SYS_PTRACE", "--cap-add", "SYS_TIME", "--cap-add", "NET_ADMIN",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--network", "none",
)
STOP_TIMEOUT_SECONDS = 300
APP_START_TIMEOUT_SECONDS = 300.0
RESTORE_TIMEOUT_SECONDS = 300.0
RESIDENT_TIMEOUT_SECONDS = 300.0
FLOOR_SAMPLES = 5
DEFAULT_SIZES = "64,256,1024,2048,4096"
# Above this, a trial takes minutes here: such sizes run only in the first --big-repeats repeats.
BIG_SIZE_MIB = 2048
# The kv app's own memory beyond its ballast, in the images (measured: 265 MiB of images for 256 MiB held).
APP_BASE_MIB = 9
# Free memory a size needs: two containers may hold the app at once (a restore starting while the source's
# memory is still being freed), plus room for the page cache and for other work on the machine.
MEMORY_HEADROOM_MIB = 3072
# Disk a size needs on the volume: the supervisor's generations (two are kept), the bare images, dd's file.
DISK_COPIES = 4

# The targets of issues 7 and 15.
CHECKPOINT_SLACK_SECONDS = 0.050
CHECKPOINT_SLACK_FRACTION = 0.02
LAZY_RATIO_TARGET = 1.2
FULL_RESTORE_RATIO_TARGET = 1.15  # issue 15: full restore, first answer, against bare CRIU's full restore
LAZY_FIRST_ANSWER_TARGET_SECONDS = 0.150
LAZY_FIRST_ANSWER_TARGET_FROM_MIB = 2048
INTEGRITY_OVERHEAD_TARGET_PERCENT = 10.0
IDLE_RSS_TARGET_MIB = 30.0
IDLE_CPU_TARGET_PERCENT = 0.5  # "~0": less than half a percent of one core

# Runs inside a container (python3 -c CODE TIMEOUT INTERVAL [ENTRYPOINT_STAMP]): wait for /health, print when it
# first answered. ENTRYPOINT_STAMP is the `date` of the instant the container's entrypoint ran.
HEALTH_POLLER = r"""
import http.client, json, sys, time, urllib.request
deadline = time.time() + float(sys.argv[1])
poll_interval = float(sys.argv[2])
entrypoint_at = float(sys.argv[3]) if len(sys.argv) > 3 else None
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
# Right after a lazy restore of GiBs, with the pages still streaming in, the next request can wait for
# seconds (seen at 4 GiB): retry until the deadline, and always say something, so no one waits for nothing.
app_started = None
while app_started is None:
    try:
        with urllib.request.urlopen("http://127.0.0.1:8080/stats", timeout=30) as reply:
            app_started = json.load(reply)["started"]
    except (OSError, http.client.HTTPException, ValueError, KeyError) as error:
        if time.time() > deadline:
            print("bench-health", json.dumps({"error": f"no answer from /stats: {error}"}), flush=True)
            sys.exit(1)
stats_answered = time.time()
report = {"poller_started": started, "healthy": healthy, "probes": probes, "app_started": app_started,
          "entrypoint_at": entrypoint_at, "stats_after": stats_answered - healthy}
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

# Runs inside a container (python3 -c CODE LINEAGE BARE): sizes of the supervisor's newest generation and of the
# bare images.
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

# Runs inside a container (python3 -c CODE PATH): CRIU's stats-dump, decoded (times in microseconds).
READ_DUMP_STATS = r"""
import json, sys
from pycriu import images
try:
    with open(sys.argv[1], "rb") as handle:
        print(json.dumps(images.load(handle)["entries"][0]["dump"]))
except Exception as error:
    print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
"""

# Runs inside a container (python3 -c CODE SECONDS): PID 1's memory now and its CPU time over SECONDS.
# proc(5): utime and stime are fields 14 and 15 of /proc/PID/stat, i.e. 12th and 13th after the ") ".
PROBE_PID1 = r"""
import json, os, sys, time
def cpu_ticks():
    fields = open("/proc/1/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])
seconds = float(sys.argv[1])
began, ticks = time.monotonic(), cpu_ticks()
time.sleep(seconds)
elapsed, ticks = time.monotonic() - began, cpu_ticks() - ticks
result = {"cpu_seconds": ticks / os.sysconf("SC_CLK_TCK"), "seconds": elapsed}
for line in open("/proc/1/status"):
    key, _, value = line.partition(":")
    if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
        result[key] = int(value.split()[0])
print(json.dumps(result))
"""

# The times a shell step prints about itself: "<marker> <exit code> <stamp> <stamp>...", stamps from `date +%s.%N`.
STAMP = "$(date +%s.%N)"

SUPERVISOR_PUBLISHED = r"final checkpoint gen-\d+ published in ([\d.]+) s"
SUPERVISOR_RESTORED = r"restored gen-\d+ .* in ([\d.]+) s(, lazily)?"
SUPERVISOR_LEASE_TAKEN = r"took the lease on "
SUPERVISOR_RESIDENT = r"app fully resident: [\d.]+ MiB of pages arrived and verified ([\d.]+) s after"
SUPERVISOR_LAZY_FAILED = r"lazy restore of \S+ failed"

MODES = ("full", "lazy")


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
            said = result.stderr.strip() or result.stdout.strip()
            raise BenchmarkError(f"`docker {shlex.join(args)}` exited {result.returncode}: {said}")
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

    def stamped_logs(self, container: str) -> list[tuple[float, str]]:
        """The log's lines with the time docker read each from the container (`docker logs -t`)."""
        result = self.run("logs", "-t", container, check=False)
        lines = []
        for line in (result.stdout + result.stderr).splitlines():
            stamp, _, text = line.partition(" ")
            try:
                lines.append((parse_docker_stamp(stamp), text))
            except ValueError:
                continue
        return lines

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


def parse_docker_stamp(text: str) -> float:
    """docker's RFC 3339 timestamps with nanoseconds ('2026-11-26T18:17:42.123456789Z') as epoch seconds."""
    if not text.endswith("Z"):
        raise ValueError(f"not a UTC docker timestamp: {text!r}")
    whole, _, fraction = text[:-1].partition(".")
    moment = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.UTC)
    return moment.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


# --- measurements shared by the phases -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Health:
    """When the app first answered /health (wall clock, seconds since the epoch)."""

    healthy_at: float
    poller_started: float  # when the first probe went out
    first_probe_answered: bool
    app_started: float  # the app's own start time, from /stats: survives a restore
    entrypoint_at: float | None  # when the container's entrypoint ran, if the poller was told
    second_answer: float  # seconds from the first answer until /stats, the next request, was answered

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

    def since_entrypoint(self) -> float:
        if self.entrypoint_at is None:
            raise BenchmarkError("the poller was not told when the entrypoint ran")
        return self.healthy_at - self.entrypoint_at


def parse_health(container: str, output: str) -> Health:
    """Read the poller's 'bench-health {...}' line."""
    match = re.search(r"^bench-health (\{.*\})\s*$", output, re.MULTILINE)
    report = json.loads(match.group(1)) if match else {"error": "the poller printed nothing"}
    if "error" in report:
        raise BenchmarkError(
            f"{container}: the app never answered /health ({report['error']}); its log ends:\n{output[-2000:]}"
        )
    entrypoint_at = report.get("entrypoint_at")
    return Health(
        healthy_at=float(report["healthy"]),
        poller_started=float(report["poller_started"]),
        first_probe_answered=int(report["probes"]) == 1,
        app_started=float(report["app_started"]),
        entrypoint_at=float(entrypoint_at) if entrypoint_at is not None else None,
        second_answer=float(report.get("stats_after", 0.0)),
    )


def wait_for_health(docker: Docker, container: str, timeout: float) -> Health:
    """Poll /health from a process exec'd into `container` (for an app that is starting, not timed)."""
    result = docker.run(
        "exec", container, "python3", "-c", HEALTH_POLLER, str(timeout), str(POLL_INTERVAL_SECONDS),
        timeout=timeout + 60, check=False,
    )
    return parse_health(container, result.stdout + "\n" + docker.log_tail(container))


def with_health_poller(command: Sequence[str], timeout: float) -> list[str]:
    """`sh -c` arguments that start the poller, then exec `command` as the container's PID 1.

    The poller is handed the `date` taken just before `command` is exec'd (taken before the poller is forked,
    so that the stamp does not race with the exec).
    """
    script = f't={STAMP}; python3 -c "$1" {timeout} {POLL_INTERVAL_SECONDS} "$t" & exec {shlex.join(command)}'
    return ["-c", script, "sh", HEALTH_POLLER]


def wait_for_poller(docker: Docker, container: str, timeout: float) -> Health:
    """Wait for the poller started by with_health_poller to report in the container's log."""
    deadline = time.monotonic() + timeout + 30
    while time.monotonic() < deadline:
        output = docker.logs(container)
        if "bench-health" in output:
            return parse_health(container, output)
        if not docker.is_running(container):  # a failed restore: say so now, not after the timeout
            raise BenchmarkError(
                f"{container} exited before the app answered; its log ends:\n{docker.log_tail(container)}"
            )
        time.sleep(0.05)
    raise BenchmarkError(f"{container}: the health poller never reported; its log ends:\n{docker.log_tail(container)}")


def find_line(docker: Docker, container: str, pattern: str) -> tuple[float, re.Match[str]]:
    """The docker timestamp and match of the first log line matching `pattern`."""
    for stamp, text in docker.stamped_logs(container):
        match = re.search(pattern, text)
        if match:
            return stamp, match
    raise BenchmarkError(f"{container}: no log line matches {pattern!r}; its log ends:\n{docker.log_tail(container)}")


def wait_for_line(
    docker: Docker, container: str, pattern: str, timeout: float, failure: str | None = None
) -> tuple[float, re.Match[str]]:
    """Poll the log for a line matching `pattern`; a line matching `failure` ends the wait at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = docker.logs(container)
        if failure and re.search(failure, text, re.MULTILINE):
            raise BenchmarkError(f"{container}: {failure!r} in its log, which ends:\n{docker.log_tail(container)}")
        if re.search(pattern, text, re.MULTILINE):
            return find_line(docker, container, pattern)
        if not docker.is_running(container):
            raise BenchmarkError(
                f"{container} exited while waiting for {pattern!r}; its log ends:\n{docker.log_tail(container)}"
            )
        time.sleep(0.05)
    raise BenchmarkError(
        f"{container}: no {pattern!r} within {timeout:.0f} s; its log ends:\n{docker.log_tail(container)}"
    )


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


def read_json(docker: Docker, container: str, code: str, *args: str) -> dict[str, Any]:
    return dict(json.loads(docker.exec(container, "python3", "-c", code, *args)))


def read_dump_stats(docker: Docker, helper: str, path: str) -> dict[str, Any]:
    stats = read_json(docker, helper, READ_DUMP_STATS, path)
    if "error" in stats:
        raise BenchmarkError(f"cannot decode CRIU's {path}: {stats['error']}")
    return stats


# --- one trial: the phases ------------------------------------------------------------------------


@dataclasses.dataclass
class Restore:
    """One restore into a new container; seconds."""

    first_answer: float | None = None  # the entrypoint runs -> /health answers
    from_docker_run: float | None = None  # just before `docker run` -> /health answers (host clock)
    criu: float | None = None  # the CRIU restore call (supervisor: from its log; bare: timed inside)
    before_criu: float | None = None  # the entrypoint runs -> the CRIU call begins
    verify: float | None = None  # supervisor: "took the lease" -> the CRIU call begins (verification)
    resident: float | None = None  # lazy: the entrypoint runs -> every page is in (supervisor: and verified)
    resident_own: float | None = None  # lazy, supervisor: its own figure, from the start of its restore
    upper_bound: bool = False  # the first probe was answered after the app had resumed
    second_answer: float | None = None  # the first answer -> the next request (/stats) answered
    supervisor_rss_kib: int | None = None  # PID 1's VmRSS once restored (lazy: once fully resident)


@dataclasses.dataclass
class Trial:
    """Everything measured for one size in one repeat (seconds, bytes, KiB)."""

    size_mib: int
    repeat: int
    order: list[str] = dataclasses.field(default_factory=list)
    restore_order: list[str] = dataclasses.field(default_factory=list)
    # checkpoint
    supervisor_checkpoint: float | None = None  # the signal -> "published" in its log: durable and verifiable
    supervisor_exited: float | None = None  # the signal -> the container has exited (`docker wait`)
    supervisor_published_own: float | None = None  # its own "published in" figure
    supervisor_criu_dump: float | None = None  # manifest stats.dump_seconds
    supervisor_frozen: float | None = None  # CRIU's stats-dump frozen_time
    supervisor_memwrite: float | None = None  # CRIU's stats-dump memwrite_time
    supervisor_bytes: int | None = None
    supervisor_second_checkpoint: float | None = None  # the restored app's checkpoint in B, same measure
    bare_dump: float | None = None
    bare_fsync: float | None = None
    bare_frozen: float | None = None
    bare_memwrite: float | None = None
    bare_bytes: int | None = None
    dd: float | None = None
    dd_mib: int | None = None
    # restore
    supervisor_full: Restore = dataclasses.field(default_factory=Restore)
    supervisor_lazy: Restore = dataclasses.field(default_factory=Restore)
    bare_full: Restore = dataclasses.field(default_factory=Restore)
    bare_lazy: Restore = dataclasses.field(default_factory=Restore)
    # the supervisor idling in A (the app running, no periodic checkpoints)
    idle_rss_kib: int | None = None
    idle_rss_anon_kib: int | None = None
    idle_rss_file_kib: int | None = None
    idle_threads: int | None = None
    idle_cpu_percent: float | None = None
    idle_seconds: float | None = None
    # docker's own costs
    docker_exec: float | None = None
    docker_stop_floor: float | None = None
    docker_start_floor: float | None = None


class TrialRunner:
    """Runs the phases of one trial on one fresh volume."""

    def __init__(self, docker: Docker, trial: Trial, label: str, dd_mib: int, idle_seconds: float) -> None:
        self.docker = docker
        self.trial = trial
        self.label = label
        self.dd_mib = dd_mib
        self.idle_seconds = idle_seconds
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
        self.trial.restore_order = list(MODES) if self.trial.repeat % 2 == 0 else list(reversed(MODES))
        for name in self.trial.order:
            phases[name]()
        self.docker_floors()
        self.docker.remove(self.helper)
        self.docker.remove_volume(self.volume)
        return self.trial

    # --- the supervisor -----------------------------------------------------------------------------

    def supervisor(self) -> None:
        """A checkpoint by SIGTERM, then a restore in each mode, as a user would."""
        source = self.docker.start(f"{self.label}-sup-a", self.volume, APP_IMAGE, *CRIU_RUN_OPTIONS, *self.ballast)
        before = wait_for_health(self.docker, source, APP_START_TIMEOUT_SECONDS)
        self.idle(source)
        (self.trial.supervisor_checkpoint, self.trial.supervisor_exited,
         self.trial.supervisor_published_own) = self.signal_checkpoint(source)
        stats = read_dump_stats(self.docker, self.helper, SUPERVISOR_STATS)  # before B's checkpoint replaces it
        self.trial.supervisor_frozen = stats["frozen_time"] / 1e6
        self.trial.supervisor_memwrite = stats["memwrite_time"] / 1e6
        sizes = read_json(self.docker, self.helper, MEASURE_IMAGES, SUPERVISOR_LINEAGE, BARE_IMAGES)
        self.trial.supervisor_bytes = int(sizes["supervisor_bytes"])
        self.trial.supervisor_criu_dump = sizes.get("supervisor_dump_seconds")
        self.docker.remove(source)

        # A generation is restored once (the supervisor claims it), so B checkpoints again for C.
        first, second = self.trial.restore_order
        middle = self.supervisor_restore("sup-b", first, before)
        self.trial.supervisor_second_checkpoint = self.signal_checkpoint(middle)[0]
        self.docker.remove(middle)
        self.docker.remove(self.supervisor_restore("sup-c", second, before))

    def idle(self, container: str) -> None:
        """The supervisor's memory, and its CPU if asked, while the app runs and nothing asks for a checkpoint."""
        probe = read_json(self.docker, container, PROBE_PID1, str(self.idle_seconds))
        self.trial.idle_rss_kib = probe["VmRSS"]
        self.trial.idle_rss_anon_kib = probe["RssAnon"]
        self.trial.idle_rss_file_kib = probe["RssFile"]
        self.trial.idle_threads = probe["Threads"]
        if self.idle_seconds > 0:
            self.trial.idle_seconds = probe["seconds"]
            self.trial.idle_cpu_percent = 100 * probe["cpu_seconds"] / probe["seconds"]

    def signal_checkpoint(self, container: str) -> tuple[float, float, float]:
        """SIGTERM to the supervisor: (signal -> published, signal -> exited, its own "published in")."""
        output = self.docker.exec(container, "sh", "-c", f'echo "bench-signal 0 {STAMP}"; kill -TERM 1')
        _, (signal_at,) = parse_stamps(output, "bench-signal", 1)
        exit_code = self.docker.run("wait", container, timeout=STOP_TIMEOUT_SECONDS).stdout.strip()
        exited_at = time.time()
        if exit_code != "0":
            raise BenchmarkError(f"{container} exited {exit_code}, not 0 (no checkpoint?); "
                                 f"its log ends:\n{self.docker.log_tail(container)}")
        published_at, match = find_line(self.docker, container, SUPERVISOR_PUBLISHED)
        return published_at - signal_at, exited_at - signal_at, float(match.group(1))

    def supervisor_restore(self, role: str, mode: str, before: Health) -> str:
        """`docker run` the image with CKPT_LAZY off or on; fills the trial's Restore; returns the container."""
        result = self.trial.supervisor_full if mode == "full" else self.trial.supervisor_lazy
        run_at = time.time()
        target = self.docker.start(
            f"{self.label}-{role}", self.volume, APP_IMAGE, *CRIU_RUN_OPTIONS, *self.ballast,
            "-e", f"CKPT_LAZY={'on' if mode == 'lazy' else 'off'}", "--entrypoint", "sh",
            command=with_health_poller(image_command(self.docker, APP_IMAGE), RESTORE_TIMEOUT_SECONDS),
        )
        after = wait_for_poller(self.docker, target, RESTORE_TIMEOUT_SECONDS)
        check_restored(target, before, after)
        restored_at, restored = find_line(self.docker, target, SUPERVISOR_RESTORED)
        if (restored.group(2) is not None) != (mode == "lazy"):
            raise BenchmarkError(f"{target}: asked for a {mode} restore, but the log says: {restored.group(0)}")
        lease_at, _ = find_line(self.docker, target, SUPERVISOR_LEASE_TAKEN)
        result.criu = float(restored.group(1))
        criu_began = restored_at - result.criu
        result.first_answer = after.since_entrypoint()
        result.from_docker_run = after.healthy_at - run_at
        result.before_criu = criu_began - (after.entrypoint_at or run_at)
        result.verify = criu_began - lease_at
        result.upper_bound = after.upper_bound(resumed_at=restored_at)
        result.second_answer = after.second_answer
        if mode == "lazy":
            resident_at, resident = wait_for_line(
                self.docker, target, SUPERVISOR_RESIDENT, RESIDENT_TIMEOUT_SECONDS, failure=SUPERVISOR_LAZY_FAILED
            )
            result.resident = resident_at - (after.entrypoint_at or run_at)
            result.resident_own = float(resident.group(1))
        result.supervisor_rss_kib = read_json(self.docker, target, PROBE_PID1, "0")["VmRSS"]
        return target

    # --- bare CRIU ------------------------------------------------------------------------------------

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
        stats = read_dump_stats(self.docker, self.helper, BARE_STATS)
        self.trial.bare_frozen = stats["frozen_time"] / 1e6
        self.trial.bare_memwrite = stats["memwrite_time"] / 1e6
        sizes = read_json(self.docker, self.helper, MEASURE_IMAGES, SUPERVISOR_LINEAGE, BARE_IMAGES)
        self.trial.bare_bytes = int(sizes["bare_bytes"])
        # Unlike the supervisor's generations, bare images can be restored any number of times.
        for mode in self.trial.restore_order:
            self.bare_restore(mode, before)

    def bare_restore(self, mode: str, before: Health) -> None:
        result = self.trial.bare_full if mode == "full" else self.trial.bare_lazy
        if mode == "full":
            script = (
                f"a={STAMP}; criu restore -d -D {BARE_IMAGES} --tcp-close -o /tmp/restore.log; code=$?; b={STAMP}; "
                'echo "bench-restore $code $a $b"; [ $code = 0 ] || { tail -n 20 /tmp/restore.log; exit $code; }; '
                "exec sleep infinity"
            )
        else:
            # The lazy-pages daemon serves the pages over a socket in the shared work dir and exits once every
            # page is in; the restore returns as soon as the tree exists.
            script = (
                f"a={STAMP}; mkdir -p /tmp/w; criu lazy-pages -D {BARE_IMAGES} -W /tmp/w -o lazy-pages.log & lazy=$!; "
                "while [ ! -S /tmp/w/lazy-pages.socket ] && kill -0 $lazy 2>/dev/null; do sleep 0.01; done; "
                f"criu restore -d -D {BARE_IMAGES} -W /tmp/w --lazy-pages --tcp-close -o restore.log; code=$?; "
                f'b={STAMP}; echo "bench-restore $code $a $b"; '
                "[ $code = 0 ] || { tail -n 20 /tmp/w/restore.log /tmp/w/lazy-pages.log; exit $code; }; "
                f'wait $lazy; code=$?; echo "bench-resident $code {STAMP}"; '
                "[ $code = 0 ] || { tail -n 20 /tmp/w/lazy-pages.log; exit $code; }; exec sleep infinity"
            )
        run_at = time.time()
        target = self.docker.start(
            f"{self.label}-bare-{mode}", self.volume, APP_IMAGE, *CRIU_RUN_OPTIONS, "--entrypoint", "sh",
            command=with_health_poller(["sh", "-c", script], RESTORE_TIMEOUT_SECONDS),
        )
        after = wait_for_poller(self.docker, target, RESTORE_TIMEOUT_SECONDS)
        check_restored(target, before, after)
        code, (restore_started, restored) = parse_stamps(self.docker.logs(target), "bench-restore", 2)
        if code != 0:
            raise BenchmarkError(f"bare criu restore ({mode}) exited {code}:\n{self.docker.logs(target)}")
        result.criu = restored - restore_started
        result.first_answer = after.since_entrypoint()
        result.from_docker_run = after.healthy_at - run_at
        result.before_criu = restore_started - (after.entrypoint_at or run_at)
        result.upper_bound = after.upper_bound(resumed_at=restored)
        result.second_answer = after.second_answer
        if mode == "lazy":
            wait_for_line(self.docker, target, r"^bench-resident ", RESIDENT_TIMEOUT_SECONDS)
            code, (resident_at,) = parse_stamps(self.docker.logs(target), "bench-resident", 1)
            if code != 0:
                raise BenchmarkError(f"bare criu lazy-pages exited {code}:\n{self.docker.logs(target)}")
            result.resident = resident_at - (after.entrypoint_at or run_at)
        self.docker.remove(target)

    # --- dd and docker ----------------------------------------------------------------------------------

    def dd(self) -> None:
        """Writing as many bytes as a checkpoint holds, durably, to the same volume."""
        self.trial.dd_mib = self.dd_mib
        script = (
            f"a={STAMP}; dd if=/dev/zero of={CHECKPOINTS}/dd.bin bs=1M count={self.dd_mib} "
            f'conv=fsync status=none; code=$?; b={STAMP}; rm -f {CHECKPOINTS}/dd.bin; echo "bench-dd $code $a $b"'
        )
        output = self.docker.exec(self.helper, "sh", "-c", script)
        code, (started, finished) = parse_stamps(output, "bench-dd", 2)
        if code != 0:
            raise BenchmarkError(f"dd exited {code}:\n{output}")
        self.trial.dd = finished - started

    def docker_floors(self) -> None:
        """What docker itself costs here, now: exec round trip, stop, start."""
        exec_times = []
        for _ in range(FLOOR_SAMPLES):
            started = time.monotonic()
            self.docker.exec(self.helper, "true")
            exec_times.append(time.monotonic() - started)
        self.trial.docker_exec = statistics.median(exec_times)

        # PID 1 with a SIGTERM handler that exits at once; it prints when it started running. The handler comes
        # first: PID 1 without one ignores SIGTERM, and `docker stop` would wait out its timeout.
        quick_exit = (
            "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
            "print('bench-start 0', repr(time.time()), flush=True); signal.pause()"
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


# --- room on this machine ---------------------------------------------------------------------------


def meminfo_mib(field: str) -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise BenchmarkError(f"/proc/meminfo has no {field}")


def room_for(size_mib: int, docker_root: str) -> str | None:
    """Why the host cannot run a trial of this size now, or None if it can."""
    needed = 2 * (size_mib + APP_BASE_MIB) + MEMORY_HEADROOM_MIB
    available = meminfo_mib("MemAvailable")
    if available < needed:
        return (f"{size_mib} MiB skipped: MemAvailable {available:.0f} MiB < {needed} MiB "
                f"(two copies of the app, which may be held at once, plus {MEMORY_HEADROOM_MIB} MiB headroom)")
    free_disk = shutil.disk_usage(docker_root).free / 2**20 if os.path.isdir(docker_root) else float("inf")
    needed_disk = DISK_COPIES * (size_mib + APP_BASE_MIB)
    if free_disk < needed_disk:
        return f"{size_mib} MiB skipped: {free_disk:.0f} MiB free on {docker_root} < {needed_disk} MiB"
    return None


# --- the report ------------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def plus(*values: float | None) -> float | None:
    return None if any(value is None for value in values) else sum(value for value in values if value is not None)


def minus(value: float | None, part: float | None) -> float | None:
    return None if value is None or part is None else value - part


def divided(value: float | None, by: float | None) -> float | None:
    return None if value is None or not by else value / by


def seconds(value: float | None, flagged: bool = False) -> str:
    return "n/a" if value is None else f"{value:.2f}{'*' if flagged else ''}"


def milliseconds(value: float | None, flagged: bool = False) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f}{'*' if flagged else ''}"


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.0f}%"


def cpu(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def kib_as_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1024:.1f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# Per-trial quantities the tables and targets share.
def baseline_dump(trial: Trial, durable: bool, paired: bool) -> float | None:
    """What the supervisor's checkpoint is held against: bare `criu dump` (durable: plus its fsync).

    Paired: the supervisor's own CRIU call stands in for the bare dump. It is the same CRIU dumping the same
    app, in the same seconds as the rest of the checkpoint, so the page-cache swings that make two dumps of a
    GiB differ by seconds here (see the caveats) cancel out; what remains is what the supervisor adds.
    """
    dump = trial.supervisor_criu_dump if paired else trial.bare_dump
    return plus(dump, trial.bare_fsync) if durable else dump


def checkpoint_limit(trial: Trial, durable: bool, paired: bool = False) -> float | None:
    """Issue 7: supervisor checkpoint <= bare dump + 50 ms + 2%."""
    bare = baseline_dump(trial, durable, paired)
    return None if bare is None else bare * (1 + CHECKPOINT_SLACK_FRACTION) + CHECKPOINT_SLACK_SECONDS


def integrity_overhead_percent(trial: Trial, paired: bool = False) -> float | None:
    """Issue 7: the supervisor's checkpoint beyond bare dump + fsync, as a share of the latter."""
    bare = baseline_dump(trial, durable=True, paired=paired)
    value = divided(minus(trial.supervisor_checkpoint, bare), bare)
    return None if value is None else 100 * value


def restore_verify_percent(trial: Trial) -> float | None:
    """The full restore's verification before CRIU, as a share of bare CRIU's full first answer."""
    value = divided(trial.supervisor_full.verify, trial.bare_full.first_answer)
    return None if value is None else 100 * value


@dataclasses.dataclass(frozen=True)
class Verdict:
    text: str
    met: bool | None


def verdict(margins: Sequence[float | None], unit: str, scale: float = 1.0, digits: int = 2) -> Verdict:
    """Met or missed, by the median of per-trial margins (positive = over the target)."""
    present = [margin for margin in margins if margin is not None]
    if not present:
        return Verdict("n/a", None)
    middle = statistics.median(present)
    met_in = sum(margin <= 0 for margin in present)
    trials = f"{met_in}/{len(present)} trials met"
    if middle <= 0:
        return Verdict(f"met, {-middle * scale:.{digits}f}{unit} to spare ({trials})", True)
    return Verdict(f"**missed by {middle * scale:.{digits}f}{unit}** ({trials})", False)


class Summary:
    """Per-size medians over the trials; ratios and margins are medians of per-trial ones."""

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
        header = ["MiB held", "image MiB sup/bare", "supervisor: signal -> published", "its CRIU dump",
                  "beyond its CRIU dump", "its CRIU frozen", "bare dump", "bare frozen", "bare fsync",
                  "bare dump+fsync", "dd (MiB)", "sup/(bare+fsync)", "sup/dd", "signal -> container exited"]
        rows = [
            [
                str(size),
                mib(self.median(size, lambda t: t.supervisor_bytes)) + "/"
                + mib(self.median(size, lambda t: t.bare_bytes)),
                seconds(self.median(size, lambda t: t.supervisor_checkpoint)),
                seconds(self.median(size, lambda t: t.supervisor_criu_dump)),
                seconds(self.median(size, lambda t: minus(t.supervisor_checkpoint, t.supervisor_criu_dump))),
                seconds(self.median(size, lambda t: t.supervisor_frozen)),
                seconds(self.median(size, lambda t: t.bare_dump)),
                seconds(self.median(size, lambda t: t.bare_frozen)),
                seconds(self.median(size, lambda t: t.bare_fsync)),
                seconds(self.median(size, lambda t: plus(t.bare_dump, t.bare_fsync))),
                f"{seconds(self.median(size, lambda t: t.dd))} ({self.median(size, lambda t: t.dd_mib) or 0:.0f})",
                ratio(self.median(size, lambda t: divided(t.supervisor_checkpoint, plus(t.bare_dump, t.bare_fsync)))),
                ratio(self.median(size, lambda t: divided(t.supervisor_checkpoint, t.dd))),
                seconds(self.median(size, lambda t: t.supervisor_exited)),
            ]
            for size in self.sizes
        ]
        return table(header, rows)

    def first_answer_table(self) -> str:
        def cell(size: int, get: Callable[[Trial], Restore]) -> str:
            return seconds(self.median(size, lambda t: get(t).first_answer),
                           self.flagged(size, lambda t: get(t).upper_bound))

        header = ["MiB held", "full: supervisor", "its verify", "its CRIU", "bare", "sup/bare",
                  "lazy: supervisor", "its CRIU", "bare", "sup/bare",
                  "fully resident: supervisor (+verified)", "bare"]
        rows = [
            [
                str(size),
                cell(size, lambda t: t.supervisor_full),
                seconds(self.median(size, lambda t: t.supervisor_full.verify)),
                seconds(self.median(size, lambda t: t.supervisor_full.criu)),
                cell(size, lambda t: t.bare_full),
                ratio(self.median(size, lambda t: divided(t.supervisor_full.first_answer, t.bare_full.first_answer))),
                cell(size, lambda t: t.supervisor_lazy),
                seconds(self.median(size, lambda t: t.supervisor_lazy.criu)),
                cell(size, lambda t: t.bare_lazy),
                ratio(self.median(size, lambda t: divided(t.supervisor_lazy.first_answer, t.bare_lazy.first_answer))),
                seconds(self.median(size, lambda t: t.supervisor_lazy.resident)),
                seconds(self.median(size, lambda t: t.bare_lazy.resident)),
            ]
            for size in self.sizes
        ]
        return table(header, rows)

    def docker_run_table(self) -> str:
        header = ["MiB held", "full: supervisor", "bare", "lazy: supervisor", "bare",
                  "supervisor start-up before CRIU, full", "lazy", "docker run -> entrypoint runs"]
        rows = [
            [
                str(size),
                seconds(self.median(size, lambda t: t.supervisor_full.from_docker_run)),
                seconds(self.median(size, lambda t: t.bare_full.from_docker_run)),
                seconds(self.median(size, lambda t: t.supervisor_lazy.from_docker_run)),
                seconds(self.median(size, lambda t: t.bare_lazy.from_docker_run)),
                seconds(self.median(size, lambda t: t.supervisor_full.before_criu)),
                seconds(self.median(size, lambda t: t.supervisor_lazy.before_criu)),
                seconds(self.median(size, lambda t: t.docker_start_floor)),
            ]
            for size in self.sizes
        ]
        return table(header, rows)

    def idle_table(self) -> str:
        header = ["MiB held", "idle VmRSS MiB", "RssAnon", "RssFile", "threads", "idle CPU % of a core",
                  "VmRSS after full restore", "after lazy restore, resident"]
        rows = [
            [
                str(size),
                kib_as_mib(self.median(size, lambda t: t.idle_rss_kib)),
                kib_as_mib(self.median(size, lambda t: t.idle_rss_anon_kib)),
                kib_as_mib(self.median(size, lambda t: t.idle_rss_file_kib)),
                f"{self.median(size, lambda t: t.idle_threads) or 0:.0f}",
                cpu(self.median(size, lambda t: t.idle_cpu_percent)),
                kib_as_mib(self.median(size, lambda t: t.supervisor_full.supervisor_rss_kib)),
                kib_as_mib(self.median(size, lambda t: t.supervisor_lazy.supervisor_rss_kib)),
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

    def margins(self, size: int, get: Callable[[Trial], float | None]) -> list[float | None]:
        return [get(trial) for trial in self.of(size)]

    def targets(self) -> dict[str, dict[int, Verdict]]:
        """Issue 7's and 15's targets, per size: met, or missed by how much."""
        names = ["checkpoint <= bare dump + 50 ms + 2%", "... against bare dump + fsync (durable)",
                 "... paired: against its own CRIU dump + fsync", "... paired: against its own CRIU dump (issue 15)",
                 "integrity overhead <= 10% (checkpoint vs bare dump + fsync)",
                 "... paired: vs its own CRIU dump + fsync", "restore-side verification <= 10% of bare full restore",
                 "full restore first answer <= 1.15x bare full (issue 15)", "lazy first answer <= 1.2x bare lazy",
                 "lazy first answer <= 150 ms (2 GiB and up)",
                 "supervisor idle RSS < 30 MiB", "supervisor idle CPU ~ 0 (< 0.5% of a core)"]
        result: dict[str, dict[int, Verdict]] = {name: {} for name in names}  # in this order
        for size in self.sizes:
            margins = functools.partial(self.margins, size)
            result.setdefault("checkpoint <= bare dump + 50 ms + 2%", {})[size] = verdict(
                margins(lambda t: minus(t.supervisor_checkpoint, checkpoint_limit(t, durable=False))), " s")
            result.setdefault("... against bare dump + fsync (durable)", {})[size] = verdict(
                margins(lambda t: minus(t.supervisor_checkpoint, checkpoint_limit(t, durable=True))), " s")
            result.setdefault("... paired: against its own CRIU dump + fsync", {})[size] = verdict(
                margins(lambda t: minus(t.supervisor_checkpoint, checkpoint_limit(t, durable=True, paired=True))),
                " s")
            result.setdefault("... paired: against its own CRIU dump (issue 15)", {})[size] = verdict(
                margins(lambda t: minus(t.supervisor_checkpoint, checkpoint_limit(t, durable=False, paired=True))),
                " s")
            result.setdefault("integrity overhead <= 10% (checkpoint vs bare dump + fsync)", {})[size] = verdict(
                margins(lambda t: minus(integrity_overhead_percent(t), INTEGRITY_OVERHEAD_TARGET_PERCENT)),
                " points", digits=0)
            result.setdefault("... paired: vs its own CRIU dump + fsync", {})[size] = verdict(
                margins(lambda t: minus(integrity_overhead_percent(t, paired=True), INTEGRITY_OVERHEAD_TARGET_PERCENT)),
                " points", digits=0)
            result.setdefault("restore-side verification <= 10% of bare full restore", {})[size] = verdict(
                margins(lambda t: minus(restore_verify_percent(t), INTEGRITY_OVERHEAD_TARGET_PERCENT)),
                " points", digits=0)
            result.setdefault("full restore first answer <= 1.15x bare full (issue 15)", {})[size] = verdict(
                margins(lambda t: minus(divided(t.supervisor_full.first_answer, t.bare_full.first_answer),
                                        FULL_RESTORE_RATIO_TARGET)), "x")
            result.setdefault("lazy first answer <= 1.2x bare lazy", {})[size] = verdict(
                margins(lambda t: minus(divided(t.supervisor_lazy.first_answer, t.bare_lazy.first_answer),
                                        LAZY_RATIO_TARGET)), "x")
            if size >= LAZY_FIRST_ANSWER_TARGET_FROM_MIB:
                result.setdefault("lazy first answer <= 150 ms (2 GiB and up)", {})[size] = verdict(
                    margins(lambda t: minus(t.supervisor_lazy.first_answer, LAZY_FIRST_ANSWER_TARGET_SECONDS)),
                    " ms", scale=1000, digits=0)
            result.setdefault("supervisor idle RSS < 30 MiB", {})[size] = verdict(
                margins(lambda t: minus(divided(t.idle_rss_kib, 1024), IDLE_RSS_TARGET_MIB)), " MiB", digits=1)
            if self.median(size, lambda t: t.idle_cpu_percent) is not None:  # measured once per repeat
                result.setdefault("supervisor idle CPU ~ 0 (< 0.5% of a core)", {})[size] = verdict(
                    margins(lambda t: minus(t.idle_cpu_percent, IDLE_CPU_TARGET_PERCENT)), " points", digits=2)
        unknown = set(result) - set(names)
        assert not unknown, f"targets missing from the ordered list: {unknown}"
        return {name: by_size for name, by_size in result.items() if by_size}

    def targets_table(self) -> str:
        targets = self.targets()
        header = ["target", *(f"{size} MiB" for size in self.sizes)]
        rows = [[name, *(by_size[size].text if size in by_size else "-" for size in self.sizes)]
                for name, by_size in targets.items()]
        return table(header, rows).replace("|---:|", "|---|", 1)

    def figures_table(self) -> str:
        """The quantities the targets are judged on, per size (medians)."""
        header = ["MiB held", "sup checkpoint", "limit: bare dump +50 ms +2%", "limit on bare dump+fsync",
                  "paired limit", "integrity overhead", "paired", "restore verify / bare full", "lazy sup/bare",
                  "lazy sup first answer (ms)", "idle RSS MiB", "idle CPU %"]
        rows = [
            [
                str(size),
                seconds(self.median(size, lambda t: t.supervisor_checkpoint)),
                seconds(self.median(size, lambda t: checkpoint_limit(t, durable=False))),
                seconds(self.median(size, lambda t: checkpoint_limit(t, durable=True))),
                seconds(self.median(size, lambda t: checkpoint_limit(t, durable=True, paired=True))),
                percent(self.median(size, integrity_overhead_percent)),
                percent(self.median(size, lambda t: integrity_overhead_percent(t, paired=True))),
                percent(self.median(size, restore_verify_percent)),
                ratio(self.median(size, lambda t: divided(t.supervisor_lazy.first_answer, t.bare_lazy.first_answer))),
                milliseconds(self.median(size, lambda t: t.supervisor_lazy.first_answer),
                             self.flagged(size, lambda t: t.supervisor_lazy.upper_bound)),
                kib_as_mib(self.median(size, lambda t: t.idle_rss_kib)),
                cpu(self.median(size, lambda t: t.idle_cpu_percent)),
            ]
            for size in self.sizes
        ]
        return table(header, rows)

    @property
    def any_upper_bound(self) -> bool:
        return any(restore.upper_bound for t in self.trials
                   for restore in (t.supervisor_full, t.supervisor_lazy, t.bare_full, t.bare_lazy))


def report(trials: Sequence[Trial], environment: dict[str, str], command: str, notes: Sequence[str]) -> str:
    summary = Summary(trials)
    repeats = max(len(summary.of(size)) for size in summary.sizes)
    parts = [
        f"Run: {environment['date']}, {environment['host']}",
        f"Command: `{command}`",
        (f"Medians of {repeats} repeat(s) per size, in seconds unless noted; ratios and target margins are medians "
        "of per-trial ones."),
        *(f"Note: {note}" for note in notes),
        "",
        "Targets (issues 7 and 15):",
        "",
        summary.targets_table(),
        "",
        "The figures they are judged on:",
        "",
        summary.figures_table(),
        "",
        "Checkpoint. Supervisor: SIGTERM -> its 'published' log line (docker's timestamp). Bare, dd: timed inside.",
        "",
        summary.checkpoint_table(),
        "",
        ("Restore, first answer: the container's entrypoint runs -> /health answers. 'its verify': took the lease "
        "-> CRIU begins. Fully resident: entrypoint -> every page in (supervisor: and verified)."),
        "",
        summary.first_answer_table(),
        "",
        ("Restore, from just before `docker run` (host clock) -> /health answers; and the supervisor's start-up "
        "(entrypoint -> CRIU begins)."),
        "",
        summary.docker_run_table(),
        "",
        ("The supervisor's own memory (MiB) and CPU: idle in A with the app running and no periodic checkpoints; "
        "VmRSS after restores."),
        "",
        summary.idle_table(),
        "",
        "Docker's own costs, measured in the same trials.",
        "",
        summary.docker_table(),
        "",
    ]
    if summary.any_upper_bound:
        parts += ["\\* in at least one trial the app already answered when the poller started: an upper bound.", ""]
    parts += [
        "Per trial (order of the phases and of the restore modes in parentheses):",
        "",
        "```",
        *(trial_line(trial) for trial in trials),
        "```",
        "",
        f"Environment: {environment['details']}",
    ]
    return "\n".join(parts) + "\n"


def trial_line(trial: Trial) -> str:
    def restore(label: str, result: Restore) -> str:
        text = f"{label} {seconds(result.first_answer, result.upper_bound)} (CRIU {seconds(result.criu)}"
        if result.verify is not None:
            text += f", verify {seconds(result.verify)}"
        if result.resident is not None:
            text += f", resident {seconds(result.resident)}"
        if result.second_answer is not None:
            text += f", next answer +{seconds(result.second_answer)}"
        return text + ")"

    return (
        f"{trial.size_mib} MiB #{trial.repeat + 1} ({'/'.join(trial.order)}; {'/'.join(trial.restore_order)}): "
        f"sup ckpt {seconds(trial.supervisor_checkpoint)} (CRIU {seconds(trial.supervisor_criu_dump)}, "
        f"frozen {seconds(trial.supervisor_frozen)}, memwrite {seconds(trial.supervisor_memwrite)}; "
        f"B's {seconds(trial.supervisor_second_checkpoint)}) "
        f"{restore('full', trial.supervisor_full)} {restore('lazy', trial.supervisor_lazy)} "
        f"idle {kib_as_mib(trial.idle_rss_kib)} MiB, CPU {cpu(trial.idle_cpu_percent)}% | "
        f"bare dump {seconds(trial.bare_dump)}+fsync {seconds(trial.bare_fsync)} "
        f"(frozen {seconds(trial.bare_frozen)}, memwrite {seconds(trial.bare_memwrite)}) "
        f"{restore('full', trial.bare_full)} {restore('lazy', trial.bare_lazy)} | "
        f"dd {seconds(trial.dd)} ({trial.dd_mib} MiB)"
    )


def image_id(docker: Docker) -> str:
    return docker.run("image", "inspect", "--format", "{{.Id}}", APP_IMAGE).stdout.strip().removeprefix("sha256:")[:12]


def describe_environment(docker: Docker) -> dict[str, str]:
    server = docker.run("version", "--format", "{{.Server.Version}}", check=False).stdout.strip() or "unknown"
    criu = docker.run(
        "run", "--rm", "--network", "none", "--entrypoint", "criu", SUPERVISOR_IMAGE, "--version", check=False
    ).stdout
    criu_version = re.search(r"Version:\s*(\S+)", criu)
    # The images are rebuilt as the supervisor changes: say which build was measured.
    built = docker.run("image", "inspect", "--format", "{{.Created}}", APP_IMAGE).stdout.strip()
    return {
        "image_id": image_id(docker),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": (f"{os.cpu_count()} CPUs, kernel {platform.release()}, "
                 f"MemAvailable {meminfo_mib('MemAvailable') / 1024:.1f} GiB at the start"),
        "details": (
            f"Docker engine {server}, CRIU {criu_version.group(1) if criu_version else 'unknown'}, "
            f"image {APP_IMAGE} ({image_id(docker)}, built {built[:19]}Z), "
            f"named volume (local driver) at {CHECKPOINTS}"
        ),
    }


# --- the command ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated MiB of app memory (default {DEFAULT_SIZES}; a size the machine has "
                             "no room for is skipped with a note)")
    parser.add_argument("--repeats", type=int, default=3, help="trials per size (default 3)")
    parser.add_argument("--big-repeats", type=int, default=1,
                        help=f"trials for sizes above {BIG_SIZE_MIB} MiB (default 1: a 4 GiB trial takes minutes)")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="how long the supervisor's idle CPU is measured, in each repeat's first trial "
                             "(default 10)")
    parser.add_argument("--markdown", metavar="OUT.md", help="also write the report to this file")
    parser.add_argument("--json", metavar="OUT.json", help="also write every trial's figures (for benchmarks/plot.py)")
    parser.add_argument("--report-from", metavar="RUN.json",
                        help="measure nothing: print the report of a run saved with --json")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(part) for part in args.sizes.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--sizes={args.sizes!r}: expected comma-separated whole numbers of MiB")
    if not args.sizes or any(size < 1 for size in args.sizes):
        parser.error("--sizes: every size must be >= 1 MiB")
    if args.repeats < 1 or args.big_repeats < 0:
        parser.error("--repeats must be >= 1 and --big-repeats >= 0")
    if args.idle_seconds <= 0:
        parser.error("--idle-seconds must be > 0")
    return args


def check_images(docker: Docker) -> None:
    for image in (SUPERVISOR_IMAGE, APP_IMAGE):
        if docker.run("image", "inspect", image, check=False).returncode != 0:
            raise BenchmarkError(f"image {image} is missing: build it with scripts/bootstrap.sh")


def raise_interrupt(signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def load_run(path: str) -> tuple[list[Trial], dict[str, str], str, list[str]]:
    """A run saved with --json, back as Trials."""
    with open(path) as handle:
        run = json.load(handle)
    restores = {field.name for field in dataclasses.fields(Trial) if field.type == "Restore"}
    trials = []
    for saved in run["trials"]:
        fields: dict[str, Any] = {key: Restore(**value) if key in restores else value for key, value in saved.items()}
        trials.append(Trial(**fields))
    return trials, run["environment"], run["command"], run["notes"]


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.report_from:
        print(report(*load_run(args.report_from)), end="")
        return 0
    command = "python3 benchmarks/migration.py " + shlex.join(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)  # so that `finally` cleans up on SIGTERM too
    docker = Docker(prefix=f"bench-{os.getpid()}-")
    trials: list[Trial] = []
    notes: list[str] = []
    image_mib: dict[int, int] = {}  # per size, the checkpoint's size: what dd writes
    try:
        check_images(docker)
        environment = describe_environment(docker)
        docker_root = docker.run("info", "--format", "{{.DockerRootDir}}").stdout.strip()
        for repeat in range(args.repeats):
            for size in args.sizes:
                if size > BIG_SIZE_MIB and repeat >= args.big_repeats:
                    if repeat == args.big_repeats:
                        notes.append(f"{size} MiB ran in {args.big_repeats} repeat(s) only (--big-repeats)")
                    continue
                problem = room_for(size, docker_root)
                if problem:
                    print(problem, file=sys.stderr, flush=True)
                    notes.append(f"repeat {repeat + 1}: {problem}")
                    continue
                trial = Trial(size_mib=size, repeat=repeat)
                # The supervisor idles alike whatever the app holds: its CPU is measured once per repeat.
                idle_seconds = args.idle_seconds if not any(t.repeat == repeat for t in trials) else 0.0
                TrialRunner(docker, trial, label=f"{size}m-r{repeat + 1}",
                            dd_mib=image_mib.get(size, size + APP_BASE_MIB), idle_seconds=idle_seconds).run()
                if trial.supervisor_bytes:
                    image_mib[size] = round(trial.supervisor_bytes / 2**20)
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
    if trials and image_id(docker) != environment["image_id"]:
        notes.append(f"{APP_IMAGE} was rebuilt during the run (other work on this machine): later trials may have "
                     "measured a different build")
    if not trials:
        print("no trial ran: " + "; ".join(notes), file=sys.stderr)
        return 1
    text = report(trials, environment, command, notes)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": command, "environment": environment, "notes": notes,
                       "trials": [dataclasses.asdict(trial) for trial in trials]}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
