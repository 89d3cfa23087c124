"""Issue 4: spot notices, request file, control socket, periodic checkpoints, coinciding triggers.

The cloud metadata services are local fakes (tests/fakes/metadata_server.py)
speaking each documented protocol on the app container's own loopback.
"""

from __future__ import annotations

import json
import os

import pytest
from dockerlib import KV_IMAGE, Container, Docker, sleep_until

FAKES = os.path.join(os.path.dirname(__file__), "..", "fakes")
PORT = 8169
FAST = {"CKPT_LEASE_INTERVAL": "0.5", "CKPT_LEASE_TIMEOUT": "3", "CKPT_POLL_INTERVAL": "0.2"}


def with_metadata_server(engine: Docker, cloud: str, env: dict[str, str]) -> Container:
    app = engine.run(KV_IMAGE, volume=engine.volume(), env={
        **FAST, "CKPT_TRIGGERS": f"sigterm,{cloud}",
        f"CKPT_{cloud.upper()}_METADATA_URL": f"http://127.0.0.1:{PORT}", **env,
    }, extra=["-v", f"{os.path.abspath(FAKES)}:/fakes:ro"])
    app.exec("sh", "-c", f"python3 /fakes/metadata_server.py {cloud} {PORT} >/tmp/server.out 2>&1 &")
    app.wait_healthy()
    return app


def generations(app: Container) -> list[str]:
    return sorted(json.loads(app.exec("criu-supervisor", "list", "--json").stdout), key=lambda g: g["generation"])


def restore_elsewhere(engine: Docker, app: Container) -> Container:
    volume = docker_volume_of(app)
    replacement = engine.run(KV_IMAGE, volume=volume, env=FAST)
    replacement.wait_healthy(timeout=60)
    return replacement


def docker_volume_of(app: Container) -> str:
    from dockerlib import docker

    mounts = json.loads(docker("inspect", "-f", "{{json .Mounts}}", app.name).stdout)
    return next(m["Name"] for m in mounts if m["Destination"] == "/checkpoints")


def test_aws_long_notice_takes_a_safety_net_then_a_final_checkpoint_before_the_deadline(engine: Docker) -> None:
    app = with_metadata_server(engine, "aws", {"CKPT_DEADLINE_MARGIN": "44"})
    app.http("POST", "/incr/work")
    app.exec("sh", "-c", "echo 50 > /tmp/announce")  # a 50 s notice: final at ~ +6 s
    app.wait_log(r"aws checkpoint gen-00000001 published .* the app kept running", timeout=30)
    # This kernel has no soft-dirty tracking: the fallback is named, and both dumps are full ones.
    assert "incremental final dump: not possible (the kernel has no soft-dirty tracking)" in app.logs()
    for _ in range(3):  # work done after the notice must survive too
        app.http("POST", "/incr/work")
    match = app.wait_log(r"final checkpoint gen-00000002 published in [\d.]+ s; (\d+) s left before the aws deadline",
                         timeout=30)
    assert int(match.group(1)) > 0
    app.wait_log("idling without the app")
    assert app.running()  # idles: a restart policy cannot restore it on this doomed machine
    assert app.stop() == 0
    replacement = restore_elsewhere(engine, app)
    assert "restored gen-00000002" in replacement.logs()
    assert replacement.http("POST", "/incr/work") == "5"
    listed = json.loads(replacement.exec("criu-supervisor", "list", "--json").stdout)
    assert {g["name"]: g["parent"] for g in listed} == {"gen-00000002": None, "gen-00000001": None}, "no chain here"


def test_gcp_short_notice_goes_straight_to_the_final_checkpoint(engine: Docker) -> None:
    app = with_metadata_server(engine, "gcp", {})
    app.http("PUT", "/kv/k", "gcp-state")
    app.exec("sh", "-c", "echo 30 > /tmp/announce")
    app.wait_log(r"final checkpoint gen-00000001 published .* s left before the gcp deadline", timeout=30)
    assert "kept running" not in app.logs()  # no safety net with a 30 s notice
    assert app.stop() == 0
    replacement = restore_elsewhere(engine, app)
    assert replacement.http("GET", "/kv/k") == "gcp-state"


def test_azure_preempt_is_acknowledged_only_after_the_checkpoint_is_published(engine: Docker) -> None:
    app = with_metadata_server(engine, "azure", {})
    app.http("PUT", "/kv/k", "azure-state")
    app.exec("sh", "-c", "echo 30 > /tmp/announce")
    app.wait_log(r"final checkpoint gen-00000001 published", timeout=30)
    acks = sleep_until(lambda: [json.loads(line) for line in app.exec("cat", "/tmp/metadata.log").stdout.splitlines()
                                if '"acknowledged"' in line], 10, what="the StartRequests acknowledgement")
    assert len(acks) == 1
    assert acks[0]["acknowledged"] == ["A123BC45-1234-5678-AB90-ABCDEF123456"]
    assert acks[0]["published"] == ["gen-00000001"]  # the server saw the generation before the ack
    assert app.stop() == 0
    assert restore_elsewhere(engine, app).http("GET", "/kv/k") == "azure-state"


def test_a_dead_metadata_endpoint_disturbs_neither_the_app_nor_sigterm(engine: Docker) -> None:
    app = engine.run(KV_IMAGE, volume=engine.volume(), env={
        **FAST, "CKPT_TRIGGERS": "sigterm,aws", "CKPT_AWS_METADATA_URL": "http://127.0.0.1:9"})  # nothing listens
    app.wait_healthy()
    app.wait_log("aws trigger")
    for _ in range(5):
        app.http("POST", "/incr/c")
    warnings = [line for line in app.logs().splitlines() if "aws trigger" in line]
    assert len(warnings) == 1, warnings  # logged once per state change, not once per poll
    assert app.stop() == 0
    assert "final checkpoint gen-00000001 published" in app.logs()


def test_file_trigger_and_checkpoint_command_each_make_exactly_one_generation(engine: Docker) -> None:
    app = engine.run(KV_IMAGE, volume=engine.volume(), env=FAST)
    app.wait_healthy()
    app.exec("sh", "-c", "echo > /checkpoints/default/checkpoint-request")
    app.wait_log(r"file checkpoint gen-00000001 published")
    result = app.exec("criu-supervisor", "checkpoint", "--leave-running", "--json")
    assert json.loads(result.stdout)["generation"] == "gen-00000002"
    assert [g["name"] for g in generations(app)] == ["gen-00000001", "gen-00000002"]
    assert app.http("POST", "/incr/c") == "1"  # still running and answering
    result = app.exec("criu-supervisor", "checkpoint")
    assert "gen-00000003 published" in result.stdout and "the app is stopped" in result.stdout
    assert app.wait_exit() == 0


def test_periodic_checkpoints_keep_the_app_running_and_answering(engine: Docker) -> None:
    app = engine.run(KV_IMAGE, volume=engine.volume(), env={**FAST, "CKPT_INTERVAL": "1", "CKPT_KEEP": "10"})
    app.wait_healthy()
    answers = []
    for _ in range(12):
        answers.append(int(app.http("POST", "/incr/c")))
    app.wait_log(r"periodic checkpoint gen-00000003 published", timeout=30)
    answers.append(int(app.http("POST", "/incr/c")))
    assert answers == list(range(1, 14))
    assert len(generations(app)) >= 3
    assert app.stop() == 0
    assert restore_elsewhere(engine, app).http("POST", "/incr/c") == "14"


@pytest.mark.parametrize("extra", ["second SIGTERM", "final request file", "checkpoint command"])
def test_coinciding_triggers_produce_exactly_one_final_checkpoint(engine: Docker, extra: str) -> None:
    app = engine.run(KV_IMAGE, volume=engine.volume(), env={**FAST, "KV_BALLAST_MIB": "256"})
    app.wait_healthy()
    app.kill("TERM")
    if extra == "second SIGTERM":
        app.kill("TERM")
    elif extra == "final request file":
        app.exec("sh", "-c", "echo final > /checkpoints/default/checkpoint-request", check=False)
    else:
        app.exec("criu-supervisor", "checkpoint", check=False)
    assert app.wait_exit() == 0
    logs = app.logs()
    assert logs.count("final checkpoint gen-") == 1, logs
    assert "gen-00000002" not in logs
