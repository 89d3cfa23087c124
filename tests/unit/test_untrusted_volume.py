"""Issue 12: what the volume holds is untrusted input. Each row of the red-team table, against the real store.

The volume is shared by every node and every client of the export: anything
can be put there. Nothing the store reads or cleans may follow a symlink out
of the lineage, block on a FIFO, crash on malformed content, or touch anything
outside CKPT_DIR/<CKPT_NAME>. Every test plants the hostile thing, runs the
store as a starting supervisor would, and checks both the named refusal and
that a canary outside the lineage is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor_pkg import criu
from supervisor_pkg.errors import LeaseLost, StoreError, VerificationFailed
from supervisor_pkg.lease import Lease
from supervisor_pkg.store import MAX_GENERATION, Store

CRIU_VERSION = "4.2.1"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the volume with a canary file, as /app or /etc of the container."""
    directory = tmp_path / "outside"
    directory.mkdir(mode=0o755)
    (directory / "canary").write_text("untouched")
    (directory / "canary").chmod(0o644)
    return directory


def untouched(outside: Path) -> bool:
    canary = outside / "canary"
    return (canary.read_text() == "untouched" and stat.S_IMODE(canary.stat().st_mode) == 0o644
            and stat.S_IMODE(outside.stat().st_mode) == 0o755 and sorted(os.listdir(outside)) == ["canary"])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "checkpoints"), "default")


def publish(store: Store, metadata: dict[str, Any] | None = None) -> Any:
    with store.staging() as staging:
        Path(staging.path, "pages-1.img").write_bytes(os.urandom(4096))
        Path(staging.path, "core-1.img").write_bytes(b"registers")
        return store.publish(staging, {"criu_version": CRIU_VERSION, **(metadata or {})})


def within(seconds: float, action: Callable[[], Any]) -> Any:
    """Run `action` in a thread; fail (not hang) if it blocks, as on a FIFO opened for reading."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = action()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"blocked for more than {seconds} s (a FIFO opened for reading?)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def unblock(path: Path) -> None:
    """Release any reader still blocked on the FIFO at `path` (if the code under test failed)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


# --- symlinks on the volume -----------------------------------------------------------------------
def test_a_symlinked_staging_dir_is_removed_as_a_link_and_its_target_survives(store: Store, outside: Path) -> None:
    store.open()
    link = Path(store.lineage, ".staging-x")
    link.symlink_to(outside)
    old = time.time() - 7200
    os.utime(link, (old, old), follow_symlinks=False)
    assert store.clean_stale_staging(older_than=60) == [".staging-x"]
    assert not os.path.lexists(link)
    assert untouched(outside)


def test_a_symlink_inside_a_stale_staging_dir_is_unlinked_not_followed(store: Store, outside: Path) -> None:
    store.open()
    staging = Path(store.lineage, ".staging-crashed")
    staging.mkdir()
    (staging / "pages-1.img").symlink_to(outside / "canary")
    (staging / "escape").symlink_to(outside)
    old = time.time() - 7200
    os.utime(staging, (old, old))
    assert store.clean_stale_staging(older_than=60) == [".staging-crashed"]
    assert untouched(outside)


def test_a_lineage_that_is_a_symlink_is_refused_and_its_target_is_not_touched(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "default").symlink_to(outside)
    store = Store(str(tmp_path / "checkpoints"), "default")
    with pytest.raises(StoreError, match=r"default.* is a symlink.*refusing to use it"):
        store.open()
    assert store.generations() == []
    assert untouched(outside), "no lease, logs or generation written into the symlink's target, no chmod"


def test_a_logs_dir_that_is_a_symlink_is_refused_and_no_file_behind_it_changes_mode(
    store: Store, outside: Path
) -> None:
    store.open()
    logs = Path(store.lineage, "logs")
    logs.rmdir()
    logs.symlink_to(outside)
    with pytest.raises(StoreError, match="logs.* is a symlink"):
        Store(store.root, store.name).open()
    assert untouched(outside)


def test_criu_keeps_its_logs_private_without_following_a_symlink_among_them(store: Store, outside: Path) -> None:
    store.open()
    Path(store.lineage, "logs", "dump-1.log").write_text("criu")
    Path(store.lineage, "logs", "passwd").symlink_to(outside / "canary")
    criu._private(store.logs)
    assert stat.S_IMODE(Path(store.lineage, "logs", "dump-1.log").stat().st_mode) == 0o600
    assert untouched(outside)


def test_a_generation_that_is_a_symlink_is_refused_and_nothing_is_written_through_it(
    store: Store, outside: Path
) -> None:
    store.open()
    Path(store.lineage, "gen-00000003").symlink_to(outside)
    [generation] = store.generations()
    with pytest.raises(VerificationFailed, match="gen-00000003.* is a symlink"):
        store.verify(generation, CRIU_VERSION)
    store.reject(generation, "refused")
    store.note(generation, "incompatible.json", "noted")
    with pytest.raises(StoreError):
        store.claim(generation, "token")
    store.prune(keep=0)
    assert untouched(outside)
    assert not os.path.lexists(Path(store.lineage, "gen-00000003")), "pruned: the link itself"


def test_a_symlinked_file_in_a_generation_is_refused(store: Store, outside: Path) -> None:
    generation = publish(store)
    target = Path(generation.path, "core-1.img")
    target.unlink()
    target.symlink_to(outside / "canary")
    with pytest.raises(VerificationFailed, match="core-1.img is not a regular file"):
        store.verify(generation, CRIU_VERSION)
    assert untouched(outside)


def test_a_symlinked_claim_is_replaced_as_a_link_never_written_through(store: Store, outside: Path) -> None:
    generation = publish(store)
    Path(generation.path, "claim.json").symlink_to(outside / "canary")
    store.claim(generation, "token")
    assert untouched(outside)
    claim = store.read_claim(generation)
    assert claim is not None and claim.lease == "token"


# --- FIFOs where files are expected --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lease.json", "latest"])
def test_a_fifo_in_the_lineage_never_blocks_a_starter(store: Store, name: str) -> None:
    store.open()
    fifo = Path(store.lineage, name)
    os.mkfifo(fifo)
    try:
        assert within(5, store.generations) == []
        lease = Lease(store.lineage_dir, {"host": "h", "container_id": "c"}, interval=0.05, timeout=0.3)  # type: ignore[arg-type]
        if name == "lease.json":
            record = within(5, lease.read)
            assert "unreadable" in record and "FIFO" in record["unreadable"]
            # Nobody's lease, which never beats: taken over after the timeout, as a dead holder's.
            assert within(10, lambda: lease.acquire(handoff_timeout=5, should_stop=lambda s: time.sleep(s))) == \
                "expired"
            assert lease.read()["owner"] == lease.token  # type: ignore[index]
        else:
            assert within(5, lambda: lease.acquire(handoff_timeout=1, should_stop=lambda s: False)) == "free"
    finally:
        unblock(fifo)


def test_a_fifo_as_a_newer_generations_manifest_is_refused_without_blocking(store: Store) -> None:
    publish(store)
    newer = Path(store.lineage, "gen-00000002")
    newer.mkdir()
    os.mkfifo(newer / "manifest.json")
    try:
        generations = within(5, store.generations)
        assert [g.name for g in generations] == ["gen-00000002", "gen-00000001"]
        with pytest.raises(VerificationFailed, match="manifest unreadable: .*FIFO"):
            within(5, lambda: store.verify(generations[0], CRIU_VERSION))
    finally:
        unblock(newer / "manifest.json")


def test_a_fifo_as_a_page_image_is_refused_without_blocking(store: Store) -> None:
    generation = publish(store)
    page = Path(generation.path, "pages-1.img")
    page.unlink()
    os.mkfifo(page)
    try:
        with pytest.raises(VerificationFailed, match="pages-1.img is not a regular file"):
            within(5, lambda: store.verify(generation, CRIU_VERSION))
    finally:
        unblock(page)


# --- malformed JSON -------------------------------------------------------------------------------------------
def rewrite(generation: Any, change: Callable[[dict[str, Any]], Any]) -> None:
    path = Path(generation.path, "manifest.json")
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


MALFORMED_MANIFESTS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("app-not-an-object", lambda m: m.update(app="kv"), "'app' has the wrong type"),
    ("source-not-an-object", lambda m: m.update(source=["host"]), "'source' has the wrong type"),
    ("terminal-fd-not-a-number", lambda m: m.update(app={"stdio": {"x": "tty[1:2]"}}), "app.stdio"),
    ("command-not-strings", lambda m: m.update(app={"command": [1, 2]}), "app.command"),
    ("size-a-string", lambda m: m["files"]["core-1.img"].update(size="9"), "core-1.img is malformed"),
    ("compressed-raw-name-escapes", lambda m: m.update(compression={"algorithm": "zstd", "pages": {
        "core-1.img": {"raw_name": "../../etc/passwd", "raw_size": 1}}}), "compression.pages"),
    ("generation-a-float", lambda m: m.update(generation=1.0), "no generation number"),
]


@pytest.mark.parametrize(("label", "change", "reason"), MALFORMED_MANIFESTS, ids=[m[0] for m in MALFORMED_MANIFESTS])
def test_a_malformed_manifest_is_a_named_refusal(store: Store, label: str, change: Any, reason: str) -> None:
    generation = publish(store)
    rewrite(generation, change)
    with pytest.raises(VerificationFailed, match="manifest is malformed") as caught:
        store.verify(generation, CRIU_VERSION)
    assert reason in caught.value.message


def test_a_deeply_nested_manifest_is_a_named_refusal_not_a_recursion_error(store: Store) -> None:
    generation = publish(store)
    Path(generation.path, "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(VerificationFailed, match="manifest unreadable"):
        store.verify(generation, CRIU_VERSION)


def test_a_huge_manifest_is_refused_before_it_is_parsed(store: Store) -> None:
    generation = publish(store)
    with open(Path(generation.path, "manifest.json"), "r+b") as handle:
        handle.truncate(64 << 20)
    with pytest.raises(VerificationFailed, match="manifest unreadable"):
        store.verify(generation, CRIU_VERSION)


@pytest.mark.parametrize("content", [
    "[" * 100_000 + "]" * 100_000,
    '{"owner": "x", "interval": "abc", "beat": 1}',
    '{"owner": 5}',
    '{"owner": "x", "time": NaN}',
    "not json",
    '"just a string"',
])
def test_a_malformed_lease_is_unreadable_and_taken_over_after_the_timeout(store: Store, content: str) -> None:
    store.open()
    Path(store.lineage, "lease.json").write_text(content)
    lease = Lease(store.lineage_dir, {"host": "h", "container_id": "c"}, interval=0.05, timeout=0.3)  # type: ignore[arg-type]
    assert "unreadable" in (lease.read() or {})
    assert lease.acquire(handoff_timeout=5, should_stop=lambda s: time.sleep(s) or False) == "expired"
    assert lease.held


# --- the pointer ------------------------------------------------------------------------------------------
def test_a_pointer_naming_the_last_generation_number_is_not_believed(store: Store) -> None:
    publish(store)
    Path(store.lineage, "latest").write_text(f"gen-{MAX_GENERATION:08d}\n")
    generation = publish(store)
    assert generation.name == "gen-00000002", "numbers stay eight digits: listed and restorable"
    assert [g.name for g in store.generations()] == ["gen-00000002", "gen-00000001"]


def test_a_pointer_naming_no_published_generation_is_not_listed(store: Store) -> None:
    publish(store)
    Path(store.lineage, "latest").write_text("gen-00000077\n")
    assert [g.name for g in store.generations()] == ["gen-00000001"]


def test_junk_in_the_lineage_is_neither_listed_nor_fatal(store: Store, outside: Path) -> None:
    store.open()
    lineage = Path(store.lineage)
    (lineage / "gen-00000009").write_text("a file, not a generation")
    os.mkfifo(lineage / "gen-00000008")
    (lineage / "gen-123").mkdir()
    (lineage / "latest").symlink_to(outside / "canary")
    publish(store)
    assert [g.name for g in store.generations()] == ["gen-00000001"]
    store.prune(keep=1)
    assert untouched(outside)


# --- properties: random and truncated content, random entries ----------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
KEYS = ["format_version", "generation", "created", "created_unix", "lineage", "source", "kernel", "machine",
        "criu_version", "files", "app", "stats", "parent", "compression", "signature", "restored_from"]
APP_KEYS = ["stdio", "command", "version", "files", "listening_ports", "own_mount_namespace"]


def _read_like_a_restore(store: Store, generation: Any) -> None:
    """Everything a starting supervisor reads of a generation; only named refusals may come out."""
    from supervisor_pkg import cli, compat, fingerprint

    try:
        manifest = store.verify(generation, CRIU_VERSION)
    except VerificationFailed:
        manifest = None
    if manifest is not None:  # accepted: every reader downstream must cope with what verify let through
        app = manifest.get("app") or {}
        fingerprint.differences(app.get("files") or {}, ["app"], app.get("command"), None, app.get("version"))
        compat.check_terminal(app.get("stdio"), isatty=lambda fd: False)
        store.memory_bytes(generation, manifest)
    with contextlib.suppress(ValueError):
        store.read_claim(generation)
    cli._describe(generation)
    store.generations()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS + [f"app.{k}" for k in APP_KEYS]), value=JSON, cut=st.integers(min_value=-1))
def test_a_manifest_with_any_field_replaced_or_cut_short_is_accepted_or_refused_by_name(
    tmp_path_factory: pytest.TempPathFactory, key: str, value: Any, cut: int
) -> None:
    store = Store(str(tmp_path_factory.mktemp("volume")), "default")
    generation = publish(store, {"app": {"stdio": {"1": "pipe:[1]"}, "command": ["app"], "files": {}}})
    path = Path(generation.path, "manifest.json")
    manifest = json.loads(path.read_text())
    if key.startswith("app."):
        manifest["app"][key[4:]] = value
    else:
        manifest[key] = value
    text = json.dumps(manifest)
    path.write_text(text if cut < 0 else text[: cut % (len(text) + 1)])
    _read_like_a_restore(store, generation)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()),
       target=st.sampled_from(["manifest.json", "claim.json", "rejected.json"]))
def test_random_bytes_in_a_generations_files_are_accepted_or_refused_by_name(
    tmp_path_factory: pytest.TempPathFactory, content: bytes, target: str
) -> None:
    store = Store(str(tmp_path_factory.mktemp("volume")), "default")
    generation = publish(store)
    Path(generation.path, target).write_bytes(content)
    _read_like_a_restore(store, generation)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_random_bytes_as_the_lease_are_a_record_or_unreadable(
    tmp_path_factory: pytest.TempPathFactory, content: bytes
) -> None:
    store = Store(str(tmp_path_factory.mktemp("volume")), "default")
    store.open()
    Path(store.lineage, "lease.json").write_bytes(content)
    lease = Lease(store.lineage_dir, {"host": "h", "container_id": "c"}, interval=0.05, timeout=0.2)  # type: ignore[arg-type]
    record = lease.read()
    assert record is not None and ("unreadable" in record or isinstance(record.get("owner"), str))
    with pytest.raises(LeaseLost):  # fencing reads it too: never ours, and never a crash
        lease.check()


ENTRY_KINDS = st.sampled_from(["file", "dir", "symlink-out", "symlink-in", "fifo", "empty-dir"])
NAMES = st.sampled_from(["gen-00000001", "gen-00000002", "gen-99999999", "latest", "lease.json", "logs",
                         ".staging-a", ".staging-b", "claim.json", "gen-1", ".nfs0001", "x"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plants=st.lists(st.tuples(NAMES, ENTRY_KINDS), max_size=6))
def test_random_entries_in_the_lineage_never_reach_outside_it(
    tmp_path_factory: pytest.TempPathFactory, plants: list[tuple[str, str]]
) -> None:
    root = tmp_path_factory.mktemp("volume")
    outside = root / "outside"
    outside.mkdir(mode=0o755)
    (outside / "canary").write_text("untouched")
    (outside / "canary").chmod(0o644)
    store = Store(str(root / "checkpoints"), "default")
    publish(store)
    lineage = Path(store.lineage)
    for name, kind in plants:
        path = lineage / name
        if os.path.lexists(path):
            continue
        if kind == "file":
            path.write_text("{}")
        elif kind in ("dir", "empty-dir"):
            path.mkdir()
            if kind == "dir":
                (path / "manifest.json").write_text("[[[")
                (path / "escape").symlink_to(outside)
        elif kind == "symlink-out":
            path.symlink_to(outside)
        elif kind == "symlink-in":
            path.symlink_to("gen-00000001")
        else:
            os.mkfifo(path)
        old = time.time() - 7200
        os.utime(path, (old, old), follow_symlinks=False)
    try:
        def everything() -> None:
            other = Store(store.root, store.name)
            try:
                other.open()
            except StoreError:
                return
            for generation in other.generations():
                _read_like_a_restore(other, generation)
                other.reject(generation, "property test")
                other.note(generation, "incompatible.json", "property test")
            other.prune(keep=1)
            other.clean_stale_staging(older_than=60)
            lease = Lease(other.lineage_dir, {"host": "h", "container_id": "c"}, 0.05, 0.2)  # type: ignore[arg-type]
            lease.read()

        within(20, everything)
    finally:
        for name, kind in plants:
            if kind == "fifo":
                unblock(lineage / name)
    assert (outside / "canary").read_text() == "untouched"
    assert stat.S_IMODE((outside / "canary").stat().st_mode) == 0o644
    assert stat.S_IMODE(outside.stat().st_mode) == 0o755 and sorted(os.listdir(outside)) == ["canary"]
