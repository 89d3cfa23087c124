"""Issue 7: lazy restores answer at once, verify every page in the background, and fail safe."""

from __future__ import annotations

import json
import re

from dockerlib import BASE_IMAGE, KV_IMAGE, Docker, docker

FAST = {"CKPT_LEASE_INTERVAL": "0.5", "CKPT_LEASE_TIMEOUT": "3"}
BIG = {**FAST, "KV_BALLAST_MIB": "320"}  # above the 256 MiB CKPT_LAZY=auto threshold


def checkpointed_app(engine: Docker, volume: str) -> None:
    app = engine.run(KV_IMAGE, volume=volume, env=BIG)
    app.wait_healthy(timeout=60)
    app.http("PUT", "/kv/k", "kept")
    assert app.stop() == 0


def test_a_big_app_is_restored_lazily_and_becomes_fully_resident(engine: Docker) -> None:
    volume = engine.volume()
    checkpointed_app(engine, volume)
    app = engine.run(KV_IMAGE, volume=volume, env=FAST)
    app.wait_healthy(timeout=60)
    assert app.http("GET", "/kv/k") == "kept"
    app.wait_log(r"app fully resident: \d+ MiB of pages arrived and verified", timeout=60)
    assert "lazily: pages arrive in the background" in app.logs()
    claim = json.loads(docker("exec", app.name, "cat", "/checkpoints/default/gen-00000001/claim.json").stdout)
    assert claim.get("restored")  # unpinned only once every page is in
    # A checkpoint right after a lazy restore waits for the pages, then works.
    assert app.stop() == 0
    again = engine.run(KV_IMAGE, volume=volume, env={**FAST, "CKPT_LAZY": "off"})
    again.wait_healthy(timeout=60)
    assert again.http("GET", "/kv/k") == "kept"
    assert "lazily" not in again.logs()


def test_sigterm_during_the_background_fill_still_checkpoints_everything(engine: Docker) -> None:
    volume = engine.volume()
    checkpointed_app(engine, volume)
    app = engine.run(KV_IMAGE, volume=volume, env=FAST)
    app.wait_log("lazily: pages arrive in the background", timeout=60)
    app.kill("TERM")  # very likely before every page has arrived
    assert app.wait_exit(timeout=120) == 0
    assert "final checkpoint gen-00000002 published" in app.logs()
    third = engine.run(KV_IMAGE, volume=volume, env=FAST)
    third.wait_healthy(timeout=60)
    assert third.http("GET", "/kv/k") == "kept"


def test_a_corrupt_page_image_kills_the_lazily_restored_app_and_is_refused(engine: Docker) -> None:
    volume = engine.volume()
    checkpointed_app(engine, volume)
    # Same size, one byte changed deep inside: only hashing can tell.
    docker("run", "--rm", "--network", "none", "-v", f"{volume}:/checkpoints", "--entrypoint", "sh", BASE_IMAGE,
           "-c", "f=$(ls -S /checkpoints/default/gen-00000001/pages-*.img | head -1); "
                 "printf 'Z' | dd of=$f bs=1 seek=200000000 conv=notrunc 2>/dev/null")
    app = engine.run(KV_IMAGE, volume=volume, env=FAST)
    assert app.wait_exit(timeout=120) == 1
    logs = app.logs()
    assert re.search(r"lazy restore of gen-00000001 failed: .*does not match its sha256.*killing the app", logs), logs
    replacement = engine.run(KV_IMAGE, volume=volume, env=FAST)
    replacement.wait_healthy(timeout=60)
    assert "skipping gen-00000001: rejected earlier" in replacement.logs()
    assert "started the app fresh" in replacement.logs()


def test_compressed_checkpoints_migrate_and_never_put_raw_pages_on_the_volume(engine: Docker) -> None:
    volume = engine.volume()
    app = engine.run(KV_IMAGE, volume=volume, env={**FAST, "CKPT_COMPRESS": "zstd"})
    app.wait_healthy()
    app.http("PUT", "/kv/k", "zstd")
    assert app.stop() == 0
    hop = engine.run(KV_IMAGE, volume=volume, env={**FAST, "CKPT_COMPRESS": "lz4", "CKPT_LAZY": "off"})
    hop.wait_healthy(timeout=60)
    assert hop.http("GET", "/kv/k") == "zstd" and "expanded gen-00000001" in hop.logs()
    hop.http("PUT", "/kv/k", "lz4")
    assert hop.stop() == 0
    listing = docker("run", "--rm", "--network", "none", "-v", f"{volume}:/checkpoints", "--entrypoint", "sh",
                     BASE_IMAGE, "-c", "ls /checkpoints/default/gen-*/").stdout
    assert ".zst" in listing or ".lz4" in listing
    assert not re.search(r"^pages-\d+\.img$", listing, re.MULTILINE), listing
    last = engine.run(KV_IMAGE, volume=volume, env={**FAST, "CKPT_LAZY": "on"})
    last.wait_healthy(timeout=60)
    assert last.http("GET", "/kv/k") == "lz4"
    last.wait_log("app fully resident", timeout=60)
