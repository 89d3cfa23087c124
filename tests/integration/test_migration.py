"""The mission: an app survives its container being stopped and replaced.

Real Docker engine, real CRIU, the supervisor as PID 1, a named volume shared
by the containers. State is checked from outside the app (HTTP, docker logs).
"""

from __future__ import annotations

import json
import re

from dockerlib import KV_IMAGE, TICKER_IMAGE, Docker


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^tick (\d+)$", text, re.MULTILINE)]


def test_ticker_continues_counting_in_the_replacement_container(engine: Docker) -> None:
    volume = engine.volume()
    first = engine.run(TICKER_IMAGE, volume=volume, env={"TICK_INTERVAL": "0.1"})
    first.wait_log(r"tick 5\n")
    assert first.stop() == 0
    assert "final checkpoint gen-00000001 published" in first.logs()
    last_in_first = ticks(first.stdout())[-1]

    second = engine.run(TICKER_IMAGE, volume=volume, env={"TICK_INTERVAL": "0.1"})
    second.wait_log(rf"tick {last_in_first + 3}\n")
    assert "restored gen-00000001" in second.logs()
    seen = ticks(second.stdout())
    # Nothing lost, nothing doubled: the output (in B's own docker logs) picks
    # up at exactly the next tick, and B never started counting from 1.
    assert seen[0] == last_in_first + 1, (last_in_first, seen[:5])
    assert "ticker started" not in second.stdout()


def test_kv_keeps_its_memory_across_a_migration(engine: Docker) -> None:
    volume = engine.volume()
    first = engine.run(KV_IMAGE, volume=volume)
    first.wait_healthy()
    first.http("PUT", "/kv/greeting", "hello from A")
    for _ in range(3):
        first.http("POST", "/incr/visits")
    before = json.loads(first.http("GET", "/stats"))
    assert first.stop() == 0

    second = engine.run(KV_IMAGE, volume=volume)
    second.wait_healthy()
    assert second.http("GET", "/kv/greeting") == "hello from A"
    assert second.http("POST", "/incr/visits") == "4"
    after = json.loads(second.http("GET", "/stats"))
    assert after["started"] == before["started"]  # the same process, not a fresh start
    assert after["pid"] == before["pid"]  # its PID inside the app's namespace is kept
    assert after["requests"] > before["requests"]
    assert "restored gen-00000001" in second.logs()


def test_three_migrations_in_a_row_keep_growing_the_state(engine: Docker) -> None:
    volume = engine.volume()
    container = engine.run(KV_IMAGE, volume=volume)
    container.wait_healthy()
    started = json.loads(container.http("GET", "/stats"))["started"]
    expected = 0
    for hop in range(1, 4):  # A -> B -> C -> D
        container.http("PUT", f"/kv/hop{hop}", f"written before hop {hop}")
        expected += 1
        assert container.http("POST", "/incr/counter") == str(expected)
        assert container.stop() == 0
        container = engine.run(KV_IMAGE, volume=volume)
        container.wait_healthy()
        assert f"restored gen-{hop:08d}" in container.logs()
        for earlier in range(1, hop + 1):
            assert container.http("GET", f"/kv/hop{earlier}") == f"written before hop {earlier}"
        assert json.loads(container.http("GET", "/stats"))["started"] == started
    expected += 1
    assert container.http("POST", "/incr/counter") == str(expected)
    # Retention (CKPT_KEEP=2) keeps the newest two complete generations.
    names = [g["name"] for g in engine.generations(volume)]
    assert names == ["gen-00000003", "gen-00000002"], names


def test_checkpoint_signal_right_after_start_is_not_lost(engine: Docker) -> None:
    volume = engine.volume()
    first = engine.run(TICKER_IMAGE, volume=volume, env={"TICK_INTERVAL": "0.1"})
    first.wait_log(r"started the app fresh")
    first.kill("TERM")  # a fraction of a second after the app started
    assert first.wait_exit(timeout=60) == 0
    assert "final checkpoint gen-00000001 published" in first.logs()
    second = engine.run(TICKER_IMAGE, volume=volume, env={"TICK_INTERVAL": "0.1"})
    second.wait_log(r"restored gen-00000001")
    second.wait_log(r"tick \d+\n")


def test_checkpoint_signal_during_restore_aborts_it_or_checkpoints_after_it_and_loses_nothing(engine: Docker) -> None:
    volume = engine.volume()
    first = engine.run(KV_IMAGE, volume=volume)
    first.wait_healthy()
    first.http("PUT", "/kv/k", "v")
    assert first.stop() == 0

    second = engine.run(KV_IMAGE, volume=volume)
    # As soon as PID 1 catches SIGTERM, send it: it lands during or right after the restore.
    from dockerlib import sleep_until

    sleep_until(lambda: second.signals_caught_by_pid1() & (1 << 14), 20, interval=0.01, what="SIGTERM handler")
    second.kill("TERM")
    assert second.wait_exit(timeout=60) == 0
    logs = second.logs()
    aborted = "asked to stop during the restore of gen-00000001: aborted it; the checkpoint is kept" in logs
    after = "restored gen-00000001" in logs and "final checkpoint gen-00000002 published" in logs
    assert aborted or after, logs

    third = engine.run(KV_IMAGE, volume=volume)
    third.wait_healthy()
    assert third.http("GET", "/kv/k") == "v"
