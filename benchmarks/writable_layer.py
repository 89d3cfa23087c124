#!/usr/bin/env python3
"""Writable-layer benchmark (issue 14): what carrying the container's writable layer adds to a checkpoint.

    python3 benchmarks/writable_layer.py [--image criu-supervisor:latest] [--repeats 5]
                                         [--layers empty,small,big] [--json OUT.json]

For each layer, one container runs the image with a trivial app (a sleeping
python3, a few MiB: the dump itself is short, so the layer's share shows) on a
fresh named volume at /checkpoints. Once the supervisor has recorded the image's
tree, the layer is written through `docker exec`:

empty  nothing: what the walk of the image alone costs (the reference);
small  1,000 files of 4 KiB in 10 directories;
big    1 GiB in 4 files of 256 MiB.

Then, --repeats times, in turn:
checkpoint  `criu-supervisor checkpoint --leave-running` (the control socket);
            its own answer gives the time from the request to the published
            generation (durable: fsynced, hashed, renamed). The supervisor's
            log (CKPT_LOG_LEVEL=debug) gives the carry's share while the app
            was frozen, the walk's share of that, the walk before the dump
            (while the app runs) and the archive's size.
tar         the bare baseline, in the same container, on the same volume, of
            the same files: `tar --sparse -cf /checkpoints/bare.tar` of the
            layer's directory plus an fsync of the archive; and sha256 of it
            (the supervisor hashes every file it publishes).
A checkpoint and a tar alternate, so that drift on a noisy machine touches
both alike. Medians are reported, and the ratio of the time the layer adds
(a layer's checkpoint minus the empty layer's) to the bare tar's.

The script also probes the other mechanism the issue names, a fanotify mark on
the container's whole filesystem (FAN_MARK_FILESYSTEM with FAN_REPORT_DFID_NAME,
needed to see creations, deletions and renames), and reports what the kernel
answers on this engine's root filesystem.

Needs Python 3.11+ and the `docker` CLI. Containers and volumes are named
cs-layer-bench-<pid>-... and removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

CRIU_SETTINGS = [
    "--cap-add", "SYS_ADMIN", "--cap-add", "SYS_PTRACE", "--cap-add", "SYS_TIME", "--cap-add", "NET_ADMIN",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
]
APP = ["python3", "-c", "import time; time.sleep(10**9)"]
LAYER_DIRECTORY = "/var/lib/bench"

WRITE_LAYER = r"""
import os, sys
kind, top = sys.argv[1], sys.argv[2]
if kind == 'small':
    for n in range(1000):
        os.makedirs(f'{top}/d{n % 10}', exist_ok=True)
        with open(f'{top}/d{n % 10}/f{n:04d}', 'wb') as f: f.write(os.urandom(4096))
elif kind == 'big':
    os.makedirs(top, exist_ok=True)
    block = os.urandom(1 << 20)
    for n in range(4):
        with open(f'{top}/big{n}.bin', 'wb') as f:
            for m in range(256): f.write(bytes([n, m]) + block[2:])
        os.sync()
print('written')
"""

BARE_TAR = r"""
import hashlib, json, os, subprocess, sys, time
top, archive = sys.argv[1], sys.argv[2]
started = time.monotonic()
subprocess.run(['tar', '--sparse', '-cf', archive, '-C', '/', top.lstrip('/')], check=True)
fd = os.open(archive, os.O_RDONLY); os.fsync(fd); os.close(fd)
written = time.monotonic()
digest = hashlib.sha256()
with open(archive, 'rb') as f:
    while chunk := f.read(1 << 20): digest.update(chunk)
hashed = time.monotonic()
size = os.path.getsize(archive)
os.unlink(archive)
print(json.dumps({'tar': written - started, 'tar_and_sha256': hashed - started, 'bytes': size}))
"""

FANOTIFY_PROBE = r"""
import ctypes, errno, os
libc = ctypes.CDLL('libc.so.6', use_errno=True)
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
FAN_REPORT_DFID_NAME, FAN_MARK_ADD, FAN_MARK_FILESYSTEM = 0xC00, 0x1, 0x100
EVENTS = 0x100 | 0x200 | 0x40 | 0x80 | 0x4 | 0x2 | 0x40000000  # create delete moved attrib modify, on dirs
for label, flags, mask in (('FAN_REPORT_DFID_NAME (sees creations, deletions, renames)', FAN_REPORT_DFID_NAME, EVENTS),
                           ('file descriptors only (sees writes, not deletions or renames)', 0, 0x2 | 0x8)):
    fd = libc.fanotify_init(flags, os.O_RDONLY)
    if fd < 0:
        print(f'{label}: fanotify_init: {errno.errorcode[ctypes.get_errno()]}'); continue
    result = libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, -100, b'/')
    print(f'{label}: ' + ('mark accepted' if result == 0 else f'mark refused, {errno.errorcode[ctypes.get_errno()]}'))
    os.close(fd)
"""

CARRY_LINE = re.compile(r"carrying (\d+) file\(s\) from the container's writable layer \((\d+) entries, (\d+) "
                        r"deletions, ([\d.]+) MiB; ([\d.]+) s while frozen, walked (\d+) entries in ([\d.]+) s\)")
PREWALK_LINE = re.compile(r"walked the writable layer before the dump, while the app runs: (\d+) entries in "
                          r"([\d.]+) s")
BASELINE_LINE = re.compile(r"recorded the image's tree for the writable-layer carry: (\d+) entries in ([\d.]+) s")
PUBLISHED = re.compile(r"checkpoint (gen-\d+) published in ([\d.]+) s")


class BenchmarkError(Exception):
    pass


class Docker:
    def __init__(self) -> None:
        self.prefix = f"cs-layer-bench-{os.getpid()}"
        self.containers: list[str] = []
        self.volumes: list[str] = []

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise BenchmarkError(f"docker {' '.join(args[:3])}... failed: {result.stderr.strip()[-500:]}")
        return result.stdout

    def volume(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        self("volume", "create", full)
        self.volumes.append(full)
        return full

    def run(self, name: str, image: str, volume: str, *command: str, env: dict[str, str] | None = None) -> str:
        full = f"{self.prefix}-{name}"
        self.containers.append(full)
        settings = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        self("run", "-d", "--name", full, "--network", "none", *CRIU_SETTINGS, "-v", f"{volume}:/checkpoints",
             *settings, image, *command)
        return full

    def logs(self, container: str) -> str:
        result = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    def wait_for(self, container: str, pattern: re.Pattern[str], timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = pattern.search(self.logs(container))
            if found:
                return found
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{container}: no {pattern.pattern!r} after {timeout} s")
            time.sleep(0.2)

    def cleanup(self) -> None:
        for name in self.containers:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)
        for name in self.volumes:
            subprocess.run(["docker", "volume", "rm", "-f", name], capture_output=True, timeout=120)


def measure_layer(docker: Docker, image: str, layer: str, repeats: int) -> dict[str, Any]:
    volume = docker.volume(layer)
    container = docker.run(layer, image, volume, *APP, env={"CKPT_LOG_LEVEL": "debug", "CKPT_KEEP": "1"})
    baseline = docker.wait_for(container, BASELINE_LINE)
    if layer != "empty":
        docker("exec", container, "python3", "-c", WRITE_LAYER, layer, LAYER_DIRECTORY)
    else:
        docker("exec", container, "mkdir", "-p", LAYER_DIRECTORY)
    trials: list[dict[str, Any]] = []
    for repeat in range(repeats):
        answer = docker("exec", container, "criu-supervisor", "checkpoint", "--leave-running")
        published = PUBLISHED.search(answer)
        if published is None:
            raise BenchmarkError(f"{container}: the checkpoint did not publish: {answer.strip()}")
        carries = CARRY_LINE.findall(docker.logs(container))
        prewalks = PREWALK_LINE.findall(docker.logs(container))
        if len(carries) != repeat + 1 or len(prewalks) != repeat + 1:
            raise BenchmarkError(f"{container}: expected {repeat + 1} carry lines, found {len(carries)}")
        files, entries, deletions, archive_mib, frozen, walked, walk = carries[-1]
        bare = json.loads(docker("exec", container, "python3", "-c", BARE_TAR, LAYER_DIRECTORY,
                                 "/checkpoints/bare.tar"))
        trial = {"checkpoint": float(published[2]), "frozen": float(frozen), "walk": float(walk),
                 "prewalk": float(prewalks[-1][1]), "walked": int(walked), "files": int(files),
                 "entries": int(entries), "deletions": int(deletions), "archive_mib": float(archive_mib),
                 "tar": bare["tar"], "tar_and_sha256": bare["tar_and_sha256"], "tar_mib": bare["bytes"] / 1048576}
        trials.append(trial)
        print(f"  {layer} #{repeat + 1}: checkpoint {trial['checkpoint']:.3f} s, frozen carry {trial['frozen']:.3f} s "
              f"(walk {trial['walk']:.3f} s), tar {trial['tar']:.3f} s", file=sys.stderr)
    return {"layer": layer, "baseline_walk": float(baseline[2]), "baseline_entries": int(baseline[1]),
            "trials": trials}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def report(results: list[dict[str, Any]], probe: str) -> str:
    by_layer = {result["layer"]: result for result in results}
    empty = median([t["checkpoint"] for t in by_layer["empty"]["trials"]]) if "empty" in by_layer else None
    empty_frozen = median([t["frozen"] for t in by_layer["empty"]["trials"]]) if "empty" in by_layer else None
    lines = ["| layer | files | archive MiB | checkpoint | adds vs empty | carry, frozen | adds, frozen | "
             "of it the walk | walk before dump | tar + fsync | tar + sha256 | adds / tar |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        trials = result["trials"]
        checkpoint = median([t["checkpoint"] for t in trials])
        frozen = median([t["frozen"] for t in trials])
        tar = median([t["tar"] for t in trials])
        adds = None if empty is None else checkpoint - empty
        adds_frozen = None if empty_frozen is None else frozen - empty_frozen
        ratio = "" if adds is None or result["layer"] == "empty" or tar <= 0 else f"{adds / tar:.2f}"
        lines.append(
            f"| {result['layer']} | {trials[-1]['files']} | {median([t['archive_mib'] for t in trials]):.1f} "
            f"| {checkpoint:.3f} s | {'' if adds is None else f'{adds:+.3f} s'} | {frozen:.3f} s "
            f"| {'' if adds_frozen is None else f'{adds_frozen:+.3f} s'} | {median([t['walk'] for t in trials]):.3f} s "
            f"({trials[-1]['walked']} entries) | {median([t['prewalk'] for t in trials]):.3f} s "
            f"| {tar:.3f} s | {median([t['tar_and_sha256'] for t in trials]):.3f} s | {ratio} |")
    walks = ", ".join(f"{r['layer']} {r['baseline_walk']:.2f} s ({r['baseline_entries']} entries)" for r in results)
    repeats = len(results[0]["trials"]) if results else 0
    return "\n".join([
        f"Medians of {repeats} leave-running checkpoints per layer (a sleeping python3 app).",
        "",
        *lines,
        "",
        f"Baseline walk at the app's start (in the background, while it runs): {walks}.",
        "",
        "fanotify on the container's root filesystem (FAN_MARK_FILESYSTEM):",
        *(f"- {line}" for line in probe.strip().splitlines()),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="criu-supervisor:latest")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", default="empty,small,big")
    parser.add_argument("--json", help="also write every trial's figures to this file")
    options = parser.parse_args(argv)
    layers = [layer for layer in options.layers.split(",") if layer]
    if not set(layers) <= {"empty", "small", "big"}:
        parser.error("--layers: a comma-separated list of empty, small, big")

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # so that `finally` cleans up on SIGTERM too
    docker = Docker()
    try:
        probe_volume = docker.volume("probe")
        probe = docker("run", "--rm", "--network", "none", *CRIU_SETTINGS, "-v", f"{probe_volume}:/checkpoints",
                       "--entrypoint", "python3", options.image, "-c", FANOTIFY_PROBE)
        results = []
        for layer in layers:
            print(f"layer {layer}:", file=sys.stderr)
            results.append(measure_layer(docker, options.image, layer, options.repeats))
            subprocess.run(["docker", "rm", "-f", docker.containers[-1]], capture_output=True, timeout=120)
    finally:
        docker.cleanup()
    if options.json:
        with open(options.json, "w") as handle:
            json.dump({"image": options.image, "results": results, "fanotify": probe}, handle, indent=1)
    print(report(results, probe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
