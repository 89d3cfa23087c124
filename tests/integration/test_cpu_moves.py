"""Issue 13: a checkpoint records its CPU; a replacement whose CPU lacks what the app may use keeps it and exits 6.

Real CRIU in real containers. This machine has one CPU, so the other CPU is the
checkpoint's record, rewritten in the test (no signing key: the manifest is
plain JSON, as a test of the comparison needs), and the baseline is checked
where it acts: in the app's environment and in what glibc's loader reports
inside the app's namespaces.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from dockerlib import BASE_IMAGE, KV_IMAGE, Docker

from supervisor_pkg import cpu

FAST_LEASE = {"CKPT_LEASE_INTERVAL": "0.5", "CKPT_LEASE_TIMEOUT": "3", "CKPT_HANDOFF_TIMEOUT": "60"}
HERE = cpu.record()


def on_volume(volume: str, script: str, stdin: str = "") -> str:
    result = subprocess.run(["docker", "run", "--rm", "-i", "--network", "none", "-v", f"{volume}:/checkpoints",
                             "--entrypoint", "sh", BASE_IMAGE, "-c", script], input=stdin, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def set_cpu_record(volume: str, record: dict[str, object]) -> None:
    """Rewrite gen-00000001's CPU record (unsigned: plain JSON), as a checkpoint made on that CPU would have."""
    on_volume(volume, "cd /checkpoints/default/gen-00000001 && python3 -c 'import json, sys; "
                      "m = json.load(open(\"manifest.json\")); m[\"cpu\"] = json.load(sys.stdin); "
                      "json.dump(m, open(\"manifest.json\", \"w\"))'", stdin=json.dumps(record))


def test_every_checkpoint_records_the_cpu_and_a_cpu_lacking_a_feature_keeps_it_and_exits_6(engine: Docker) -> None:
    volume = engine.volume()
    app = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    app.wait_healthy(timeout=60)
    app.http("PUT", "/kv/k", "kept")
    assert app.stop() == 0
    manifest = json.loads(on_volume(volume, "cat /checkpoints/default/gen-00000001/manifest.json"))
    assert manifest["cpu"]["flags"] == HERE["flags"] and manifest["cpu"]["baseline"] == "native"
    assert "cpuinfo.img" in manifest["files"], "CRIU's own record (cpu_cap IMAGE) travels too"

    absent = sorted(cpu.ISA_FLAGS - set(HERE["flags"]))
    assert absent, "this CPU has every feature the supervisor knows of"
    other = {**manifest["cpu"], "flags": sorted({*manifest["cpu"]["flags"], absent[0]}),
             "model": "A CPU of another instance type", "level": "x86-64-v4"}
    set_cpu_record(volume, other)
    replacement = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    assert replacement.wait_exit(timeout=60) == 6
    logs = replacement.logs()
    assert re.search(rf"this container cannot restore gen-00000001: this CPU, .* lacks {absent[0]}, which the "
                     r"app's CPU, A CPU of another instance type .* had and the app may use", logs), logs
    assert "rejected.json" not in on_volume(volume, "ls /checkpoints/default/gen-00000001")

    set_cpu_record(volume, manifest["cpu"])
    right_cpu = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    right_cpu.wait_healthy(timeout=60)
    assert right_cpu.http("GET", "/kv/k") == "kept"


DIAGNOSE = ("echo GLIBC_TUNABLES=${GLIBC_TUNABLES:-unset}; "
            "/lib64/ld-linux-x86-64.so.2 --list-diagnostics | grep -E '^dl_hwcaps_subdirs(_active)?='; "
            "echo ready; exec sleep 600")


def _diagnostics(engine: Docker, env: dict[str, str]) -> dict[str, str]:
    app = engine.run(BASE_IMAGE, "sh", "-c", DIAGNOSE, volume=engine.volume(), env={**FAST_LEASE, **env})
    app.wait_log(r"ready\n", timeout=60)
    return dict(line.split("=", 1) for line in app.stdout().splitlines() if "=" in line)


@pytest.mark.skipif(HERE["level"] != "x86-64-v4", reason="needs an x86-64-v4 CPU to see a v3 baseline act")
def test_a_baseline_shows_in_the_apps_environment_and_in_what_glibc_reports_inside_its_namespaces(
    engine: Docker,
) -> None:
    native = _diagnostics(engine, {})
    bounded = _diagnostics(engine, {"CKPT_CPU_BASELINE": "x86-64-v3"})
    assert native["GLIBC_TUNABLES"] == "unset"
    assert bounded["GLIBC_TUNABLES"].startswith("glibc.cpu.hwcaps=-AVX512F")
    subdirs = bounded["dl_hwcaps_subdirs"].strip('"').split(":")
    v4 = 1 << subdirs.index("x86-64-v4")
    assert int(native["dl_hwcaps_subdirs_active"], 16) & v4, "this CPU's v4 libraries are active natively"
    assert not int(bounded["dl_hwcaps_subdirs_active"], 16) & v4, "the baseline keeps glibc off v4"
