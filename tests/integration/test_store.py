"""Issue 3: the store on a shared volume is atomic, verified, fenced, and carries files.

Real containers and real CRIU; a Docker named volume stands in for NFS.
"""

from __future__ import annotations

import json
import re
import threading

from dockerlib import BASE_IMAGE, KV_IMAGE, Container, Docker, docker, sleep_until

# Short lease timings so that the tests run in seconds; production defaults are 5/30/300 s.
FAST_LEASE = {"CKPT_LEASE_INTERVAL": "0.5", "CKPT_LEASE_TIMEOUT": "3", "CKPT_HANDOFF_TIMEOUT": "60"}


def on_volume(engine: Docker, volume: str, script: str) -> str:
    """Run a shell script against the volume in a throwaway container."""
    return docker("run", "--rm", "--network", "none", "-v", f"{volume}:/checkpoints",
                  "--entrypoint", "sh", BASE_IMAGE, "-c", script).stdout


def make_generation(engine: Docker, volume: str, marker: str, env: dict[str, str] | None = None) -> None:
    """A kv container that stores `marker` and checkpoints on stop."""
    app = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE, **(env or {})})
    app.wait_healthy()
    app.http("PUT", "/kv/made-by", marker)
    assert app.stop() == 0, app.logs()


def test_sigkill_during_a_dump_never_publishes_a_partial_generation(engine: Docker) -> None:
    volume = engine.volume()
    app = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE, "KV_BALLAST_MIB": "1536"})
    app.wait_healthy(timeout=60)
    app.kill("TERM")
    sleep_until(lambda: ".staging-" in app.exec("ls", "-a", "/checkpoints/default", check=False).stdout,
                20, interval=0.02, what="the dump to start writing")
    app.kill("KILL")  # the host dies mid-dump
    listing = on_volume(engine, volume, "ls -a /checkpoints/default")
    assert ".staging-" in listing and "gen-" not in listing, listing

    replacement = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    replacement.wait_healthy(timeout=60)
    logs = replacement.logs()
    assert "taking over" in logs, logs  # the dead instance's lease expired
    assert "started the app fresh (no checkpoint" in logs, logs
    assert "restored" not in logs
    assert "removed 1 unfinished checkpoint(s) left by a crashed writer" in logs, logs
    assert ".staging-" not in on_volume(engine, volume, "ls -a /checkpoints/default")


def test_full_volume_publishes_nothing_and_stops_the_app_gracefully(engine: Docker) -> None:
    volume = engine.volume(["--driver", "local", "--opt", "type=tmpfs", "--opt", "device=tmpfs",
                            "--opt", "o=size=24m"])
    # Keeps the tmpfs mounted (and its contents) between containers, for inspection.
    observer = engine.run(BASE_IMAGE, "infinity", volume=volume, extra=["--entrypoint", "sleep"], criu_settings=False)
    app = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE, "KV_BALLAST_MIB": "64"})
    app.wait_healthy(timeout=60)
    assert app.stop() == 143  # kv has no SIGTERM handler: killed by SIGTERM, as without us
    logs = app.logs()
    # (CRIU's log is on the full volume too: its ENOSPC line may be cut short, and the supervisor says so.)
    assert re.search(r"ERROR: checkpoint failed: .* -> the checkpoint volume is full", logs), logs
    assert "falling back to the app's own graceful stop" in logs
    names = observer.exec("ls", "-a", "/checkpoints/default").stdout.split()
    assert not [n for n in names if n.startswith((".staging-", "gen-"))], names


def test_corrupted_generations_are_refused_and_the_previous_one_is_used(engine: Docker) -> None:
    volume = engine.volume()
    make_generation(engine, volume, "first")
    # Start fresh on purpose, so that both generations stay unclaimed.
    make_generation(engine, volume, "second", env={"CKPT_RESTORE": "never"})
    on_volume(engine, volume, "cd /checkpoints/default/gen-00000002 && "
              "printf 'X' | dd of=pages-2.img bs=1 seek=4096 conv=notrunc 2>/dev/null")

    app = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    app.wait_healthy()
    logs = app.logs()
    assert "refusing gen-00000002: gen-00000002: pages-2.img does not match its sha256" in logs, logs
    assert "restored gen-00000001" in logs
    assert app.http("GET", "/kv/made-by") == "first"
    rejected = json.loads(on_volume(engine, volume, "cat /checkpoints/default/gen-00000002/rejected.json"))
    assert "sha256" in rejected["reason"]


def test_truncated_file_and_corrupt_manifest_fall_back_to_a_cold_start(engine: Docker) -> None:
    for damage, reason in [
        ("truncate -s 100 gen-00000001/pages-2.img", "truncated"),
        ("echo '{not json' > gen-00000001/manifest.json", "manifest unreadable"),
        ("rm gen-00000001/core-1.img", "core-1.img is missing"),
    ]:
        volume = engine.volume()
        make_generation(engine, volume, "before")
        on_volume(engine, volume, f"cd /checkpoints/default && {damage}")
        app = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
        app.wait_healthy()
        logs = app.logs()
        assert reason in logs and "started the app fresh" in logs, (damage, logs)
        assert "restored" not in logs

    volume = engine.volume()
    make_generation(engine, volume, "before")
    on_volume(engine, volume, "truncate -s 100 /checkpoints/default/gen-00000001/pages-2.img")
    required = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE, "CKPT_RESTORE": "require"})
    assert required.wait_exit() == 3


def test_two_containers_starting_at_once_restore_exactly_once(engine: Docker) -> None:
    volume = engine.volume()
    make_generation(engine, volume, "original")
    env = {**FAST_LEASE, "CKPT_HANDOFF_TIMEOUT": "5"}
    started: list[Container] = []
    threads = [threading.Thread(target=lambda: started.append(engine.run(KV_IMAGE, volume=volume, env=env)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first, second = started

    def outcome() -> list[str]:
        logs = [first.logs(), second.logs()]
        return logs if sum("restored gen-00000001" in log for log in logs) == 1 and any(
            "still leased" in log for log in logs) else []

    logs = sleep_until(outcome, 30, what="one restore and one refusal")
    winner, loser = (first, second) if "restored gen-00000001" in logs[0] else (second, first)
    assert loser.wait_exit() == 5
    assert "another instance holds the lease" in loser.logs()
    assert winner.running()
    assert winner.http("GET", "/kv/made-by") == "original"


def test_handoff_replacement_waits_and_restores_the_final_state(engine: Docker) -> None:
    volume = engine.volume()
    old = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    old.wait_healthy()
    old.http("POST", "/incr/counter")
    new = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    new.wait_log("another instance holds the lease")
    for _ in range(4):  # work done while the replacement is waiting is not lost
        old.http("POST", "/incr/counter")
    assert old.stop() == 0
    new.wait_healthy(timeout=60)
    assert "restored gen-00000001" in new.logs()
    assert new.http("POST", "/incr/counter") == "6"


def test_expired_lease_is_taken_over_after_the_timeout(engine: Docker) -> None:
    volume = engine.volume()
    old = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    old.wait_healthy()
    old.kill("KILL")  # the host vanished without a checkpoint
    new = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    new.wait_healthy(timeout=30)
    logs = new.logs()
    assert re.search(r"has not beaten for \d+ s \(CKPT_LEASE_TIMEOUT\); taking over", logs), logs
    assert "started the app fresh" in logs


FILES_APP = r"""
import os, time
os.makedirs('/var/lib/app', exist_ok=True)
journal = open('/tmp/journal.txt', 'a')
scratch = open('/tmp/scratch.bin', 'w+'); scratch.write('deleted but open'); scratch.flush()
os.unlink('/tmp/scratch.bin')
n = 0
while True:
    n += 1
    journal.write(f'line {n}\n'); journal.flush()
    with open('/var/lib/app/state', 'w') as f: f.write(str(n))
    scratch.seek(0)
    print('tick', n, scratch.read(), flush=True)
    time.sleep(0.1)
"""


def test_files_in_the_writable_layer_migrate_intact(engine: Docker) -> None:
    volume = engine.volume()
    env = {**FAST_LEASE, "CKPT_STATE_PATHS": "/var/lib/app"}
    first = engine.run(BASE_IMAGE, "python3", "-c", FILES_APP, volume=volume, env=env)
    first.wait_log(r"tick 5 ")
    assert first.stop() == 0
    assert "carrying 2 file(s)" in first.logs(), first.logs()
    last = int(re.findall(r"tick (\d+) ", first.stdout())[-1])

    second = engine.run(BASE_IMAGE, "python3", "-c", FILES_APP, volume=volume, env=env)
    second.wait_log(rf"tick {last + 5} deleted but open")
    journal = second.exec("cat", "/tmp/journal.txt").stdout.split("\n")
    numbers = [int(line.split()[1]) for line in journal if line]
    assert numbers == list(range(1, len(numbers) + 1)) and numbers[-1] >= last + 5, numbers
    assert int(second.exec("cat", "/var/lib/app/state").stdout) >= last + 5
    # A second hop carries them again (they now predate the container).
    assert second.stop() == 0
    third = engine.run(BASE_IMAGE, "python3", "-c", FILES_APP, volume=volume, env=env)
    third.wait_log(r"restored gen-00000002")
    third.wait_log(rf"tick {last + 10} ")


def test_everything_written_is_private(engine: Docker) -> None:
    volume = engine.volume()
    make_generation(engine, volume, "x")
    wrong = on_volume(engine, volume, "find /checkpoints/default \\( -type d ! -perm 700 \\) -o "
                                      "\\( -type f ! -perm 600 \\) -print")
    assert wrong == "", wrong


def test_signed_generations_refuse_a_wrong_or_missing_signature(engine: Docker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key, other = tmp_path / "key", tmp_path / "other"
    key.write_text("correct horse battery staple\n")
    other.write_text("an entirely different secret\n")
    mount = ["-v", f"{key}:/run/secrets/ckpt-key:ro"]
    signed = {**FAST_LEASE, "CKPT_SIGNING_KEY_FILE": "/run/secrets/ckpt-key"}

    volume = engine.volume()
    make_generation(engine, volume, "signed")
    # unsigned generation, key now required
    app = engine.run(KV_IMAGE, volume=volume, env=signed, extra=mount)
    app.wait_healthy()
    assert "the manifest is not signed" in app.logs()
    assert app.stop() == 0  # this one is signed

    manifest = on_volume(engine, volume, "cat /checkpoints/default/gen-00000002/manifest.json")
    assert '"hmac-sha256"' in manifest and "correct horse" not in manifest
    intruder = engine.run(KV_IMAGE, volume=volume, env=signed, extra=["-v", f"{other}:/run/secrets/ckpt-key:ro"])
    intruder.wait_healthy()
    assert "the manifest's signature is wrong" in intruder.logs()
    assert "restored" not in intruder.logs()


def test_a_criu_restore_failure_of_this_container_is_explained_cleaned_up_and_keeps_the_checkpoint(
    engine: Docker,
) -> None:
    volume = engine.volume()
    make_generation(engine, volume, "kept")
    # The app (root) held SYS_TIME, which this replacement lacks: found before CRIU runs (CRIU would fail
    # setting the time namespace's clock offsets). CKPT_CANNOT_RESTORE=fresh: a fresh start, the checkpoint kept.
    without_sys_time = ["--cap-add", "SYS_ADMIN", "--cap-add", "SYS_PTRACE", "--cap-add", "NET_ADMIN",
                        "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"]
    app = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE, "CKPT_CANNOT_RESTORE": "fresh"},
                     criu_settings=False, extra=without_sys_time)
    app.wait_healthy()
    logs = app.logs()
    assert re.search(r"this container cannot restore gen-00000001: .*SYS_TIME", logs), logs
    assert "started the app fresh (this container cannot restore gen-00000001)" in logs
    processes = app.exec("ps", "-eo", "comm=").stdout.split()
    assert sorted(p for p in processes if p != "ps") == ["criu-supervisor", "python3", "tini"], processes
    listing = on_volume(engine, volume, "ls /checkpoints/default/gen-00000001/")
    assert "rejected.json" not in listing and "incompatible.json" in listing
    missing = app.exec("python3", "-c", __import__("dockerlib").HTTP_CLIENT, "GET", "/kv/made-by", check=False)
    assert missing.returncode == 1 and "HTTP 404" in missing.stdout  # a fresh app: the key is gone
