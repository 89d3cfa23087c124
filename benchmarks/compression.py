"""Benchmark: does compressing page images shorten the time to a durable checkpoint?

    python3 benchmarks/compression.py [--mib 256] [--kinds random,zeros,typical] [--markdown OUT.md]

For the kv example holding MIB of random, zero-heavy and typical (a Python heap
of small dicts) memory, take a leave-running checkpoint with CKPT_COMPRESS=none,
zstd and lz4 on the same volume, in one run, and report:
- the compression ratio (raw page bytes / bytes on the volume);
- the supervisor's CPU seconds for the checkpoint (hashing, and compression);
- the measured checkpoint time on this machine's volume, beside `dd conv=fsync`
  of the raw bytes on the same volume;
- the checkpoint time computed for 200 MiB/s and 500 MiB/s network volumes:
  none = raw / V; compressed = max(raw / measured compression rate, packed / V),
  since compression streams while CRIU writes locally.
Not a timed test. This machine is noisy (2 cores shared with other work): read
ratios, and compare figures from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import uuid

IMAGE = "criu-supervisor-example-kv:latest"
SETTINGS = ["--cap-add", "SYS_ADMIN", "--cap-add", "SYS_PTRACE", "--cap-add", "SYS_TIME", "--cap-add", "NET_ADMIN",
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined", "--network", "none"]
MODES = ("none", "zstd", "lz4")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def docker(*args: str, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=600)
    if check and result.returncode:
        raise RuntimeError(f"docker {' '.join(args[:3])}...: {result.stderr.strip()}")
    return result.stdout


def wait_healthy(name: str, timeout: float = 300) -> None:
    probe = "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=2)"
    deadline = time.monotonic() + timeout
    while subprocess.run(["docker", "exec", name, "python3", "-c", probe], capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} never answered")
        time.sleep(0.2)


def supervisor_cpu(name: str) -> float:
    fields = docker("exec", name, "cat", "/proc/1/stat").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def measure(prefix: str, kind: str, mib: int, mode: str) -> dict[str, float]:
    name, volume = f"{prefix}-{kind}-{mode}", f"{prefix}-{kind}-{mode}-vol"
    try:
        docker("run", "-d", "--name", name, *SETTINGS, "-v", f"{volume}:/checkpoints", "-e", f"KV_BALLAST_MIB={mib}",
               "-e", f"KV_BALLAST_KIND={kind}", "-e", f"CKPT_COMPRESS={mode}", IMAGE)
        wait_healthy(name)
        cpu_before = supervisor_cpu(name)
        reply = json.loads(docker("exec", name, "criu-supervisor", "checkpoint", "--leave-running", "--json"))
        cpu = supervisor_cpu(name) - cpu_before
        manifest = json.loads(docker("exec", name, "sh", "-c", "cat /checkpoints/default/gen-*/manifest.json"))
        packed = sum(entry["size"] for entry in manifest["files"].values())
        table = (manifest.get("compression") or {}).get("pages", {})
        raw = packed - sum(manifest["files"][n]["size"] for n in table) + sum(e["raw_size"] for e in table.values())
        return {"seconds": reply["seconds"], "criu_seconds": reply["criu_seconds"], "cpu": cpu,
                "raw": raw, "packed": packed}
    finally:
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)


def dd_seconds(prefix: str, nbytes: int) -> float:
    """`dd conv=fsync` of the same bytes on a fresh volume, timed inside the container."""
    name, volume = f"{prefix}-dd", f"{prefix}-dd-vol"
    timed = (f"import subprocess, time; t = time.monotonic(); subprocess.run(['dd', 'if=/dev/zero', "
             f"'of=/checkpoints/dd.bin', 'bs=4M', 'count={max(1, nbytes >> 22)}', 'conv=fsync'], "
             f"capture_output=True, check=True); print(time.monotonic() - t)")
    try:
        docker("run", "-d", "--name", name, "--network", "none", "-v", f"{volume}:/checkpoints",
               "--entrypoint", "sleep", IMAGE, "infinity")
        return float(docker("exec", name, "python3", "-c", timed))
    finally:
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)


def _shown_rate(rate: float) -> str:
    return '-' if rate == float('inf') else '>10000' if rate > 1e4 else f'{rate:.0f}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--kinds", default="random,zeros,typical")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    prefix = f"bench-compress-{uuid.uuid4().hex[:6]}"
    rows = []
    for kind in args.kinds.split(","):
        results = {mode: measure(prefix, kind, args.mib, mode) for mode in MODES}
        baseline = results["none"]
        dd = dd_seconds(prefix, int(baseline["raw"]))
        for mode, result in results.items():
            ratio = result["raw"] / result["packed"]
            extra_cpu = max(result["cpu"] - baseline["cpu"], 1e-3) if mode != "none" else 0.0
            rate = result["raw"] / extra_cpu / 2**20 if mode != "none" else float("inf")  # MiB/s per CPU-second
            wall_rate = result["raw"] / 2**20 / max(result["seconds"], 1e-3)
            at = {}
            for speed in (200, 500):
                raw_time = result["raw"] / 2**20 / speed
                at[speed] = raw_time if mode == "none" else max(result["raw"] / 2**20 / wall_rate,
                                                                 result["packed"] / 2**20 / speed)
            rows.append((kind, mode, ratio, result["cpu"], rate, result["seconds"], dd, at[200], at[500]))
    header = ("| heap | compress | ratio | supervisor CPU s | compress MiB/CPU-s | checkpoint s (here) | "
              "dd fsync of raw s | at 200 MiB/s | at 500 MiB/s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header] + [
        f"| {k} | {m} | {r:.2f} | {c:.2f} | {_shown_rate(rate)} | {s:.2f} | {d:.2f} | "
        f"{a2:.2f} | {a5:.2f} |" for k, m, r, c, rate, s, d, a2, a5 in rows
    ]
    table = "\n".join(lines)
    print(f"{args.mib} MiB heaps, one run, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n{table}")
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
