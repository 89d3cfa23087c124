"""Lazy restores (CKPT_LAZY=on, an opt-in since issue 11) answer at once and verify every page in the background.

The default restores fully: every byte is verified before the app runs, so a
corrupt page image is refused before the app answers once.
"""

from __future__ import annotations

import json
import re

from dockerlib import BASE_IMAGE, KV_IMAGE, Docker, docker

FAST = {"CKPT_LEASE_INTERVAL": "0.5", "CKPT_LEASE_TIMEOUT": "3"}
BIG = {**FAST, "KV_BALLAST_MIB": "320"}  # above the 256 MiB CKPT_LAZY=auto threshold
LAZY = {**FAST, "CKPT_LAZY": "on"}


def checkpointed_app(engine: Docker, volume: str) -> None:
    app = engine.run(KV_IMAGE, volume=volume, env=BIG)
    app.wait_healthy(timeout=60)
    app.http("PUT", "/kv/k", "kept")
    assert app.stop() == 0


def test_a_big_app_is_restored_lazily_and_becomes_fully_resident(engine: Docker) -> None:
    volume = engine.volume()
    checkpointed_app(engine, volume)
    app = engine.run(KV_IMAGE, volume=volume, env=LAZY)
    app.wait_healthy(timeout=60)
    assert app.http("GET", "/kv/k") == "kept"
    app.wait_log(r"app fully resident: \d+ MiB of pages arrived and verified", timeout=60)
    assert "lazily: its pages arrive and are verified in the background" in app.logs()
    claim = json.loads(docker("exec", app.name, "cat", "/checkpoints/default/gen-00000001/claim.json").stdout)
    assert claim.get("resumed")
    # A checkpoint right after a lazy restore waits for the pages, then works.
    assert app.stop() == 0
    again = engine.run(KV_IMAGE, volume=volume, env={**FAST, "CKPT_LAZY": "off"})
    again.wait_healthy(timeout=60)
    assert again.http("GET", "/kv/k") == "kept"
    assert "lazily" not in again.logs()


def test_sigterm_during_the_background_fill_still_checkpoints_everything(engine: Docker) -> None:
    volume = engine.volume()
    checkpointed_app(engine, volume)
    app = engine.run(KV_IMAGE, volume=volume, env=LAZY)
    app.wait_log("lazily: its pages arrive", timeout=60)
    app.kill("TERM")  # very likely before every page has arrived
    assert app.wait_exit(timeout=120) == 0
    assert "final checkpoint gen-00000002 published" in app.logs()
    third = engine.run(KV_IMAGE, volume=volume, env=FAST)
    third.wait_healthy(timeout=60)
    assert third.http("GET", "/kv/k") == "kept"


def corrupt_a_page_deep_inside(volume: str) -> None:
    # Same size, one byte changed deep inside: only hashing can tell.
    docker("run", "--rm", "--network", "none", "-v", f"{volume}:/checkpoints", "--entrypoint", "sh", BASE_IMAGE,
           "-c", "f=$(ls -S /checkpoints/default/gen-00000001/pages-*.img | head -1); "
                 "printf 'Z' | dd of=$f bs=1 seek=200000000 conv=notrunc 2>/dev/null")


def test_by_default_a_corrupt_page_image_is_refused_before_the_app_runs(engine: Docker) -> None:
    volume = engine.volume()
    checkpointed_app(engine, volume)
    corrupt_a_page_deep_inside(volume)
    app = engine.run(KV_IMAGE, volume=volume, env=FAST)
    app.wait_log(r"started the app fresh", timeout=120)  # (docker logs may lag the app's first answer)
    app.wait_healthy(timeout=60)
    logs = app.logs()
    assert re.search(r"refusing gen-00000001: gen-00000001: pages-\d+\.img does not match its sha256", logs), logs
    assert "restored gen-00000001" not in logs and "started the app fresh" in logs
    assert app.exec("python3", "-c", __import__("dockerlib").HTTP_CLIENT, "GET", "/kv/k", check=False).returncode == 1


def test_with_ckpt_lazy_on_a_corrupt_page_image_kills_the_app_that_ran_on_it_and_exits_7(engine: Docker) -> None:
    volume = engine.volume()
    checkpointed_app(engine, volume)
    corrupt_a_page_deep_inside(volume)
    app = engine.run(KV_IMAGE, volume=volume, env=LAZY)
    assert app.wait_exit(timeout=120) == 7
    logs = app.logs()
    assert re.search(r"killed the lazily restored app of gen-00000001 after it ran [\d.]+ s on pages not yet "
                     r"verified: .*does not match its sha256.*\. What it did and acknowledged since the restore is "
                     r"lost", logs), logs
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
