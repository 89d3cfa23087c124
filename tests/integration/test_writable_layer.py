"""Issue 14: the container's writable layer is carried whole, not only the files open at the dump.

Real containers and real CRIU, two hops. In the first container the test changes
the filesystem the way an app does (through `docker exec`: the layer is the
container's, whoever writes it): created, changed, deleted and renamed files and
directories, modes, owners, times, hard and symbolic links, a sparse file, a FIFO,
a directory of the image replaced by a link; none of it open at the dump. Each
replacement must show every entry exactly as the container before it had it at
its dump, checked from outside with one snapshot script run in both.

The image is CS_LAYER_IMAGE (default criu-supervisor:latest, which CI builds).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from dockerlib import BASE_IMAGE, Container, Docker

IMAGE = os.environ.get("CS_LAYER_IMAGE", BASE_IMAGE)
FAST_LEASE = {"CKPT_LEASE_INTERVAL": "0.5", "CKPT_LEASE_TIMEOUT": "3", "CKPT_HANDOFF_TIMEOUT": "60"}
ENV = {**FAST_LEASE, "CKPT_CARRY_EXCLUDE": "/var/cache/app"}
TICKER = "import time\nn = 0\nwhile True:\n    n += 1\n    print('tick', n, flush=True)\n    time.sleep(0.2)\n"
BASELINE = r"recorded the image's tree for the writable-layer carry: \d+ entries"

# What the first container does to its filesystem (as root, like the app would).
FIRST_CHANGES = r"""
import os, shutil
def make(path, data, mode=0o644, owner=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f: f.write(data)
    os.chmod(path, mode)
    if owner: os.chown(path, *owner)
make('/var/lib/app/db/table.ibd', b'rows' * 4096, 0o660, (999, 998))
os.chown('/var/lib/app/db', 999, 998); os.chmod('/var/lib/app/db', 0o2770)
os.mkdir('/var/lib/app/db/empty-database', 0o700)
os.link('/var/lib/app/db/table.ibd', '/var/lib/app/table.hardlink')
os.symlink('db/table.ibd', '/var/lib/app/current')
os.symlink('/usr/bin/python3', '/var/lib/app/python')
os.symlink('/dev/stdout', '/var/lib/app/log')
os.mkfifo('/var/lib/app/control', 0o620)
with open('/var/lib/app/sparse.img', 'wb') as f:
    f.seek(1 << 20); f.write(b'data'); f.seek(100 << 20); f.write(b'tail'); f.truncate(256 << 20)
make('/var/lib/app/times', b't')
os.utime('/var/lib/app/times', ns=(1_400_000_000_123_456_789, 1_500_000_000_987_654_321))
make('/var/cache/app/blob', b'excluded: CKPT_CARRY_EXCLUDE')
with open('/etc/issue', 'ab') as f: f.write(b'changed in place\n')
os.chmod('/etc/issue.net', 0o600)
os.chown('/usr/share/doc/procps', 4242, 4243)
os.utime('/etc/host.conf', ns=(1_234_000_000_000_000_001, 1_234_000_000_000_000_002))
os.unlink('/etc/motd')
shutil.rmtree('/usr/share/doc/iptables')
os.rename('/etc/debian_version', '/etc/debian_version.renamed')
os.rename('/var/lib/app/db/empty-database', '/var/lib/app/db/renamed-database')
shutil.rmtree('/srv'); os.symlink('var/lib/app', '/srv')
print('changed')
"""

# The second container, restored from the first, changes more: the third must have both.
SECOND_CHANGES = r"""
import os
with open('/var/lib/app/hop2.log', 'w') as f: f.write('second container\n')
os.unlink('/var/lib/app/db/table.ibd')  # made by the first container (its hard link stays)
os.rename('/var/lib/app/current', '/var/lib/app/current-renamed')
os.unlink('/etc/issue.net')  # an image file the first container changed
os.unlink('/etc/shells')  # an image file untouched before
print('changed')
"""

# Every entry under the roots as the app sees it; files read with O_NOATIME so the atimes compared stay.
SNAPSHOT = r"""
import hashlib, json, os, stat, sys
ENGINE = {'/etc/hosts', '/etc/hostname', '/etc/resolv.conf', '/etc/mtab'}  # made by the engine per container
entries, inodes = {}, {}
def note(path):
    info = os.lstat(path)
    inodes.setdefault(info.st_ino, []).append(path)
    entry = {'type': stat.S_IFMT(info.st_mode), 'mode': oct(stat.S_IMODE(info.st_mode)),
             'owner': [info.st_uid, info.st_gid], 'nlink': info.st_nlink, 'mtime': info.st_mtime_ns, 'ino': info.st_ino}
    if stat.S_ISLNK(info.st_mode):
        entry['target'] = os.readlink(path)
    elif stat.S_ISREG(info.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
        with os.fdopen(fd, 'rb') as f: entry['sha256'] = hashlib.sha256(f.read()).hexdigest()
        entry.update(size=info.st_size, atime=info.st_atime_ns, sparse=info.st_blocks * 512 < info.st_size)
    entries[path] = entry
for root in sys.argv[1:]:
    if not os.path.lexists(root):
        continue
    note(root)
    if os.path.islink(root):
        continue
    for directory, subdirs, files in os.walk(root):
        for name in subdirs + files:
            path = os.path.join(directory, name)
            if path not in ENGINE:
                note(path)
for entry in entries.values():
    entry['links'] = sorted(inodes[entry.pop('ino')])
print(json.dumps(entries, sort_keys=True))
"""
ROOTS = ["/etc", "/usr/share/doc", "/var/lib", "/srv"]


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> Iterator[Docker]:
    factory = Docker()
    factory.prefix = f"cs-layer-{uuid.uuid4().hex[:8]}"
    try:
        yield factory
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            factory.print_logs()
        factory.cleanup()


def snapshot(container: Container) -> dict[str, Any]:
    return json.loads(container.exec("python3", "-c", SNAPSHOT, *ROOTS).stdout)


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [f"{path}: {before.get(path)} -> {after.get(path)}" for path in sorted(set(before) | set(after))
            if before.get(path) != after.get(path)]


def last_tick(container: Container) -> int:
    return int(re.findall(r"tick (\d+)", container.stdout())[-1])


def test_the_writable_layer_is_carried_whole_and_equal_over_two_hops(engine: Docker) -> None:
    volume = engine.volume()
    first = engine.run(IMAGE, "python3", "-c", TICKER, volume=volume, env=ENV)
    first.wait_log(BASELINE)  # changes from now on are seen, deletions included
    assert first.exec("python3", "-c", FIRST_CHANGES).stdout.strip() == "changed"
    first_state = snapshot(first)
    assert first_state["/var/lib/app/sparse.img"]["sparse"] and "/etc/motd" not in first_state
    assert first.stop() == 0, first.logs()
    assert re.search(r"carrying \d+ file\(s\) from the container's writable layer \(\d+ entries, [1-9]\d* deletions",
                     first.logs()), first.logs()
    ticks = last_tick(first)

    second = engine.run(IMAGE, "python3", "-c", TICKER, volume=volume, env=ENV)
    second.wait_log(r"restored gen-00000001")
    second.wait_log(BASELINE)
    second.wait_log(rf"tick {ticks + 3}\b")  # the app itself came back, and goes on counting
    second_state = snapshot(second)
    assert differences(first_state, second_state) == [], "\n".join(differences(first_state, second_state))
    assert "app" not in second.exec("ls", "/var/cache").stdout.split(), "CKPT_CARRY_EXCLUDE=/var/cache/app"

    assert second.exec("python3", "-c", SECOND_CHANGES).stdout.strip() == "changed"
    second_state = snapshot(second)
    assert second.stop() == 0, second.logs()

    third = engine.run(IMAGE, "python3", "-c", TICKER, volume=volume, env=ENV)
    third.wait_log(r"restored gen-00000002")
    third_state = snapshot(third)
    assert differences(second_state, third_state) == [], "\n".join(differences(second_state, third_state))
    for gone in ("/etc/motd", "/usr/share/doc/iptables", "/etc/debian_version", "/etc/issue.net", "/etc/shells",
                 "/var/lib/app/db/table.ibd", "/var/lib/app/current"):
        assert gone not in third_state, f"{gone} came back"
    assert third_state["/var/lib/app/table.hardlink"]["links"] == ["/var/lib/app/table.hardlink"]
    assert third_state["/var/lib/app/hop2.log"]["owner"] == [0, 0]
