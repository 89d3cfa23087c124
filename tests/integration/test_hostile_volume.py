"""Issue 12: hostile volume content and bad settings, where the effect would be inside the container.

Real containers on a Docker named volume. Each plants what another node (or
another client of the NFS export) could put on the shared volume, then checks
the one readable line, the documented outcome, and that the container's own
files are as the image has them.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile

from dockerlib import BASE_IMAGE, KV_IMAGE, Docker, docker

FAST_LEASE = {"CKPT_LEASE_INTERVAL": "0.5", "CKPT_LEASE_TIMEOUT": "3", "CKPT_HANDOFF_TIMEOUT": "60"}


def on_volume(volume: str, script: str, stdin: bytes | None = None) -> str:
    """Run a shell script against the volume in a throwaway container (stdin: bytes handed to it)."""
    result = subprocess.run(["docker", "run", "--rm", "-i", "--network", "none", "-v", f"{volume}:/checkpoints",
                             "--entrypoint", "sh", BASE_IMAGE, "-c", script],
                            input=stdin or b"", capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def test_a_symlinked_staging_dir_pointing_into_the_container_deletes_nothing_there(engine: Docker) -> None:
    volume = engine.volume()
    on_volume(volume, "mkdir -p /checkpoints/default && ln -s /app /checkpoints/default/.staging-evil && "
                      "touch -h -d '2 hours ago' /checkpoints/default/.staging-evil")
    app = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    app.wait_healthy(timeout=60)
    assert app.exec("test", "-f", "/app/kv.py", check=False).returncode == 0, "the image's /app/kv.py is intact"
    assert "removed 1 unfinished checkpoint(s)" in app.logs()
    assert "staging-evil" not in on_volume(volume, "ls -a /checkpoints/default")


def test_a_lineage_that_is_a_symlink_into_the_container_exits_4_and_changes_nothing(engine: Docker) -> None:
    volume = engine.volume()
    on_volume(volume, "ln -s /etc /checkpoints/default")
    app = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    assert app.wait_exit(timeout=60) == 4
    logs = app.logs()
    assert re.search(r"ERROR: the checkpoint volume /checkpoints cannot be used: .*default.* is a symlink", logs), logs
    # A fresh container of the same image: /etc as the image has it (the failed one's /etc is gone with it).
    mode = docker("run", "--rm", "--entrypoint", "stat", KV_IMAGE, "-c", "%a", "/etc").stdout.strip()
    assert mode == "755"


def test_a_fifo_as_the_lease_is_taken_over_after_the_lease_timeout_and_nothing_hangs(engine: Docker) -> None:
    volume = engine.volume()
    on_volume(volume, "mkdir -p /checkpoints/default && mkfifo /checkpoints/default/lease.json")
    app = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    app.wait_healthy(timeout=60)
    assert re.search(r"lease of host None container \? has not beaten for \d+ s .*taking over", app.logs()), app.logs()
    assert app.stop() == 0, "docker stop does not wait out its timeout"


def test_a_full_volume_at_start_exits_4_and_leaves_no_empty_lease(engine: Docker) -> None:
    volume = engine.volume(["--driver", "local", "--opt", "type=tmpfs", "--opt", "device=tmpfs", "--opt", "o=size=1m"])
    observer = engine.run(BASE_IMAGE, "infinity", volume=volume, extra=["--entrypoint", "sleep"], criu_settings=False)
    observer.exec("sh", "-c", "mkdir -p /checkpoints/default/logs && "
                              "dd if=/dev/zero of=/checkpoints/fill bs=64k 2>/dev/null; true")
    app = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    assert app.wait_exit(timeout=60) == 4
    assert re.search(r"cannot be used: .*volume is full", app.logs()), app.logs()
    assert "lease.json" not in observer.exec("ls", "-a", "/checkpoints/default").stdout


def test_ckpt_dir_under_proc_exits_4(engine: Docker) -> None:
    app = engine.run(KV_IMAGE, env={**FAST_LEASE, "CKPT_DIR": "/proc/sys"})
    assert app.wait_exit(timeout=60) == 4, app.logs()
    assert "cannot be used" in app.logs()


def test_a_control_socket_over_an_image_file_exits_2_and_the_file_is_intact(engine: Docker) -> None:
    app = engine.run(KV_IMAGE, volume=engine.volume(), env={**FAST_LEASE, "CKPT_CONTROL_SOCKET": "/etc/passwd"})
    assert app.wait_exit(timeout=60) == 2
    assert "CKPT_CONTROL_SOCKET" in app.logs() and "/etc/passwd" in app.logs(), app.logs()


def test_a_misspelt_setting_gets_one_warning_naming_the_right_one(engine: Docker) -> None:
    app = engine.run(KV_IMAGE, volume=engine.volume(), env={**FAST_LEASE, "CKPT_INTERVALL": "60"})
    app.wait_healthy(timeout=60)
    assert "CKPT_INTERVALL is not a criu-supervisor setting (did you mean CKPT_INTERVAL?)" in app.logs()


def _hostile_archive() -> bytes:
    """A carried-files archive another node could write: the root's owner, the engine's hosts file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        root = tarfile.TarInfo(".")
        root.type, root.uid, root.gid, root.mode = tarfile.DIRTYPE, 4242, 4242, 0o777
        tar.addfile(root)
        data = b"6.6.6.6 example.com\n"
        hosts = tarfile.TarInfo("etc/hosts")
        hosts.size = len(data)
        tar.addfile(hosts, io.BytesIO(data))
    return buffer.getvalue()


def test_a_hostile_carried_files_archive_is_refused_whole_and_the_container_is_as_its_image(engine: Docker) -> None:
    volume = engine.volume()
    app = engine.run(KV_IMAGE, volume=volume, env={**FAST_LEASE})
    app.wait_healthy(timeout=60)
    assert app.stop() == 0
    archive = _hostile_archive()
    digest = hashlib.sha256(archive).hexdigest()
    # Without a signing key nothing authenticates the archive: re-hash it in the manifest, as an attacker would.
    script = ("cd /checkpoints/default/gen-00000001 && cat > carried-files.tar && python3 -c \""
              "import json; m = json.load(open('manifest.json')); "
              f"m['files']['carried-files.tar'] = {{'size': {len(archive)}, 'sha256': '{digest}'}}; "
              "json.dump(m, open('manifest.json', 'w'))\"")
    on_volume(volume, script, stdin=archive)
    replacement = engine.run(KV_IMAGE, volume=volume, env=FAST_LEASE)
    replacement.wait_log(r"started the app fresh", timeout=60)
    logs = replacement.logs()
    assert re.search(r"cannot put back the carried files: member '\.'", logs), logs
    assert replacement.exec("stat", "-c", "%u", "/").stdout.strip() == "0"
    assert "6.6.6.6" not in replacement.exec("cat", "/etc/hosts").stdout
    rejected = json.loads(on_volume(volume, "cat /checkpoints/default/gen-00000001/rejected.json"))
    assert "carried files" in rejected["reason"]
