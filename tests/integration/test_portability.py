"""Issue 13: what differs between engines, tried under Docker.

Podman's default capability set lacks NET_RAW, MKNOD and AUDIT_WRITE, which
the app holds under Docker; `--cap-drop` of those three gives a container the
same set, so both outcomes are tried here (under Podman itself in
test_engines.py). A seccomp filter on the supervisor makes every checkpoint
fail: that is said at start, not at SIGTERM.
"""

from __future__ import annotations

from dockerlib import CRIU_SETTINGS, KV_IMAGE, Docker

FAST_LEASE = {"CKPT_LEASE_INTERVAL": "0.5", "CKPT_LEASE_TIMEOUT": "3", "CKPT_HANDOFF_TIMEOUT": "60"}
PODMANS_DEFAULT_SET = ["--cap-drop", "NET_RAW", "--cap-drop", "MKNOD", "--cap-drop", "AUDIT_WRITE"]


def checkpointed(engine: Docker, env: dict[str, str]) -> str:
    volume = engine.volume()
    app = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE, **env})
    app.wait_healthy(timeout=60)
    app.http("PUT", "/kv/k", "kept")
    assert app.stop() == 0, app.logs()
    return volume


def test_a_checkpoint_of_an_app_with_dockers_set_names_the_caps_a_podman_like_set_lacks(engine: Docker) -> None:
    volume = checkpointed(engine, {})
    podman_like = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE, extra=PODMANS_DEFAULT_SET)
    assert podman_like.wait_exit(timeout=60) == 6
    logs = podman_like.logs()
    for name in ("NET_RAW", "MKNOD", "AUDIT_WRITE"):
        assert f"--cap-add {name}" in logs, logs


def test_with_ckpt_portable_caps_the_app_restores_into_a_podman_like_set(engine: Docker) -> None:
    volume = checkpointed(engine, {"CKPT_PORTABLE_CAPS": "1"})
    podman_like = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE, extra=PODMANS_DEFAULT_SET)
    podman_like.wait_healthy(timeout=60)
    assert "restored gen-00000001" in podman_like.logs()
    assert podman_like.http("GET", "/kv/k") == "kept"
    status = podman_like.exec("sh", "-c", "grep CapBnd /proc/$(pgrep -f /app/kv.py | head -1)/status").stdout
    bounding = int(status.split()[1], 16)
    assert not bounding & (1 << 13), "the app holds no NET_RAW: it was started with the portable set"


def test_a_seccomp_filter_on_the_supervisor_is_named_at_start(engine: Docker) -> None:
    engines_default_seccomp = [value for value in CRIU_SETTINGS if value != "seccomp=unconfined"]
    engines_default_seccomp.remove("--security-opt")  # the one that went with seccomp=unconfined
    app = engine.run(KV_IMAGE, volume=engine.volume(), env=FAST_LEASE, criu_settings=False,
                     extra=engines_default_seccomp)
    app.wait_healthy(timeout=60)
    logs = app.logs()
    assert "ERROR: no checkpoint can work in this container: the supervisor runs under a seccomp filter" in logs, logs
    assert "seccomp=unconfined" in logs
