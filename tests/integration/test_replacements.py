"""Issue 11: a good checkpoint is never lost, whatever the replacement does wrong or suffers.

Real containers and real CRIU. A replacement that is misconfigured, hangs, is
killed or stopped during its restore, or runs another build of the app, never
condemns or consumes the checkpoint: the next correctly configured replacement
restores the state. Each test checks that state from outside (the kv app's
counter and keys), not from the supervisor's own log alone.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from dockerlib import BASE_IMAGE, CRIU_SETTINGS, KV_IMAGE, Container, Docker, docker

FAST_LEASE = {"CKPT_LEASE_INTERVAL": "0.5", "CKPT_LEASE_TIMEOUT": "3", "CKPT_HANDOFF_TIMEOUT": "60"}


def without(capability: str) -> list[str]:
    """The README's settings less one --cap-add."""
    settings = list(CRIU_SETTINGS)
    index = settings.index(capability)
    del settings[index - 1: index + 1]
    return settings


def on_volume(volume: str, script: str) -> str:
    return docker("run", "--rm", "--network", "none", "-v", f"{volume}:/checkpoints", "--entrypoint", "sh",
                  BASE_IMAGE, "-c", script).stdout


def generation_files(volume: str, name: str = "gen-00000001") -> list[str]:
    return on_volume(volume, f"ls /checkpoints/default/{name}/").split()


def checkpointed_kv(engine: Docker, volume: str, count: int = 5, env: dict[str, str] | None = None) -> None:
    """A kv app with a session and a counter at `count`, checkpointed by docker stop."""
    app = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE, **(env or {})})
    app.wait_healthy(timeout=60)
    app.http("PUT", "/kv/session", "alice")
    for _ in range(count):
        app.http("POST", "/incr/counter")
    assert app.stop() == 0, app.logs()


def assert_state_restored(app: Container, count: int = 5) -> None:
    app.wait_healthy(timeout=90)
    assert "restored gen-" in app.logs(), app.logs()
    assert app.http("GET", "/kv/session") == "alice"
    assert app.http("POST", "/incr/counter") == str(count + 1)


@pytest.fixture
def hang_in_criu(tmp_path: Path) -> list[str]:
    """Settings that make the replacement's CRIU hang at its pre-restore stage, for real.

    CRIU reads /etc/criu/default.conf in RPC mode too; an action script there
    runs at each stage. One that sleeps at "pre-restore" leaves CRIU waiting on
    it with no log line and no I/O: a restore that makes no progress, as when
    CRIU's restorer waits on a zombie.
    """
    script = tmp_path / "hang.sh"
    script.write_text('#!/bin/sh\n[ "$CRTOOLS_SCRIPT_ACTION" = pre-restore ] && exec sleep 600\nexit 0\n')
    script.chmod(0o755)
    conf = tmp_path / "default.conf"
    conf.write_text("action-script /hang.sh\n")
    return ["-v", f"{script}:/hang.sh:ro", "-v", f"{conf}:/etc/criu/default.conf:ro"]


def test_a_replacement_without_sys_time_exits_6_and_the_next_one_restores_the_state(engine: Docker) -> None:
    volume = engine.volume()
    checkpointed_kv(engine, volume)
    typo = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE, criu_settings=False, extra=without("SYS_TIME"))
    assert typo.wait_exit(timeout=60) == 6
    logs = typo.logs()
    assert "this container cannot restore gen-00000001" in logs and "--cap-add SYS_TIME" in logs, logs
    assert "The checkpoint is kept for a replacement that can" in logs
    files = generation_files(volume)
    assert "rejected.json" not in files and "incompatible.json" in files

    fixed = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    assert_state_restored(fixed)


def test_a_replacement_missing_a_capability_the_app_held_exits_6_at_once_instead_of_hanging(engine: Docker) -> None:
    volume = engine.volume()
    checkpointed_kv(engine, volume)
    started = time.monotonic()
    podman_like = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE, extra=["--cap-drop", "NET_RAW"])
    assert podman_like.wait_exit(timeout=60) == 6
    assert time.monotonic() - started < 30, "checked before CRIU runs: no restore that hangs"
    assert "the app held CAP_NET_RAW, which this container lacks" in podman_like.logs()
    assert "--cap-add NET_RAW" in podman_like.logs()

    fixed = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    assert_state_restored(fixed)


def test_with_ckpt_cannot_restore_fresh_the_app_starts_fresh_and_the_checkpoint_survives(engine: Docker) -> None:
    volume = engine.volume()
    checkpointed_kv(engine, volume)
    fresh = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE, "CKPT_CANNOT_RESTORE": "fresh"},
                       criu_settings=False, extra=without("SYS_TIME"))
    fresh.wait_healthy(timeout=60)
    assert "gen-00000001 is left on the volume, not condemned" in fresh.logs()
    assert fresh.http("POST", "/incr/counter") == "1", "a fresh app"
    fresh.kill("KILL")  # dies before any checkpoint of its own

    fixed = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    assert_state_restored(fixed)


def test_a_restore_that_hangs_is_killed_after_ckpt_restore_stall_and_the_checkpoint_is_kept(
    engine: Docker, hang_in_criu: list[str]
) -> None:
    volume = engine.volume()
    checkpointed_kv(engine, volume)
    stuck = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE, "CKPT_RESTORE_STALL": "3"}, extra=hang_in_criu)
    started = time.monotonic()
    assert stuck.wait_exit(timeout=60) == 6
    assert time.monotonic() - started < 30
    logs = stuck.logs()
    assert "restore made no progress for 3 s (CKPT_RESTORE_STALL) and was killed" in logs, logs
    assert "rejected.json" not in generation_files(volume)

    fixed = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    assert_state_restored(fixed)
    assert "stopped before its app ran" in fixed.logs(), "the stuck restore's claim is void"


def test_sigterm_during_a_slow_restore_ends_the_container_at_once_and_keeps_the_checkpoint(
    engine: Docker, hang_in_criu: list[str]
) -> None:
    volume = engine.volume()
    checkpointed_kv(engine, volume)
    slow = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE, "CKPT_LOG_LEVEL": "debug"}, extra=hang_in_criu)
    slow.wait_log("calling CRIU to restore gen-00000001", timeout=60)
    started = time.monotonic()
    assert slow.stop(timeout=60) == 0
    assert time.monotonic() - started < 10, "honoured at once, not after the engine's timeout"
    assert "asked to stop during the restore of gen-00000001: aborted it; the checkpoint is kept" in slow.logs()

    fixed = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    assert_state_restored(fixed)


def test_sigterm_during_the_restore_of_a_large_app_is_prompt(engine: Docker) -> None:
    # No stand-in for slowness here: a real 1.5 GiB restore, stopped as it begins.
    volume = engine.volume()
    checkpointed_kv(engine, volume, env={"KV_BALLAST_MIB": "1536"})
    slow = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE, "CKPT_LOG_LEVEL": "debug"})
    slow.wait_log("calling CRIU to restore gen-00000001", timeout=60)
    started = time.monotonic()
    assert slow.stop(timeout=60) == 0
    assert time.monotonic() - started < 10
    logs = slow.logs()
    stopped_during = "asked to stop during the restore" in logs
    checkpointed_after = "final checkpoint gen-00000002 published" in logs
    assert stopped_during or checkpointed_after, logs  # a fast machine may finish the restore first

    fixed = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    assert_state_restored(fixed)


def test_a_replacement_killed_during_its_restore_never_consumes_the_checkpoint(
    engine: Docker, hang_in_criu: list[str]
) -> None:
    volume = engine.volume()
    checkpointed_kv(engine, volume, env={"KV_BALLAST_MIB": "512"})
    # Killed at several moments of its start: waiting for the lease, verifying, inside CRIU, just resumed.
    for delay in (0.3, 0.8, 1.5, 3.0):
        doomed = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
        time.sleep(delay)
        doomed.kill("KILL")
    # And once held inside CRIU for certain.
    held = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE, "CKPT_LOG_LEVEL": "debug"}, extra=hang_in_criu)
    held.wait_log("calling CRIU to restore gen-00000001", timeout=60)
    held.kill("KILL")

    survivor = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    assert_state_restored(survivor)
    assert "started the app fresh" not in survivor.logs()


def test_another_build_of_the_app_starts_fresh_with_the_reason_recorded_and_the_same_build_restores(
    engine: Docker,
) -> None:
    tag = f"cs-test-kv-v2-{uuid.uuid4().hex[:8]}"
    build = subprocess.run(["docker", "build", "-q", "-t", tag, "-"], text=True, capture_output=True, timeout=300,
                           input=f"FROM {KV_IMAGE}\nRUN echo '# version 2' >> /app/kv.py\n")
    assert build.returncode == 0, build.stderr
    try:
        volume = engine.volume()
        checkpointed_kv(engine, volume)
        deployed = engine.run(tag, volume=volume, env=FAST_LEASE)
        deployed.wait_healthy(timeout=60)
        logs = deployed.logs()
        assert "not restoring gen-00000001 into another app: its files differ: /app/kv.py" in logs, logs
        assert deployed.http("POST", "/incr/counter") == "1", "the new build starts fresh"
        noted = json.loads(on_volume(volume, "cat /checkpoints/default/gen-00000001/app-changed.json"))
        assert "/app/kv.py" in noted["reason"]
        assert "rejected.json" not in generation_files(volume), "not corrupt: another version's checkpoint"
        deployed.kill("KILL")

        rolled_back = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)  # the old build again
        assert_state_restored(rolled_back)
    finally:
        docker("rmi", "-f", tag, check=False)


def test_another_apps_checkpoint_copied_into_the_lineage_is_refused(engine: Docker) -> None:
    volume = engine.volume()
    ticker = engine.run("criu-supervisor-example-ticker:latest", volume=volume, env={"CKPT_NAME": "ticker"})
    ticker.wait_log(r"tick 3\n")
    assert ticker.stop() == 0
    on_volume(volume, "mkdir -p /checkpoints/default && cp -a /checkpoints/ticker/gen-00000001 "
                      "/checkpoints/default/gen-00000001")
    kv = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    kv.wait_healthy(timeout=60)
    logs = kv.logs()
    assert "it was made for the lineage 'ticker', not 'default'" in logs, logs
    assert "started the app fresh" in logs and "tick" not in kv.stdout()
