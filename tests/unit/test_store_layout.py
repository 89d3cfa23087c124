"""Store: the checkpoint layout on the volume, publication by rename, verification, claims, retention.

No CRIU: the "images" are files this test writes into a staging directory, as
CRIU would (mode 0644).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor_pkg import store as store_module
from supervisor_pkg.errors import ConfigError, StoreError, VerificationFailed
from supervisor_pkg.store import Generation, PageHasher, Store, read_signing_key

CRIU_VERSION = "4.2.1"
IMAGES = {
    "core-1.img": b"registers and sigactions " * 3,
    "mm-1.img": b"memory map",
    "pages-1.img": bytes(range(256)) * 64,
}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "checkpoints"), "app", keep=2)


def publish(store: Store, images: dict[str, bytes] | None = None, criu_version: str = CRIU_VERSION) -> Generation:
    with store.staging() as staging:
        for name, data in (IMAGES if images is None else images).items():
            path = Path(staging.path, name)
            path.write_bytes(data)
            path.chmod(0o644)  # what CRIU leaves
        return store.publish(staging, {"criu_version": criu_version})


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def staging_dirs(store: Store) -> list[str]:
    if not os.path.isdir(store.lineage):
        return []
    return [entry for entry in os.listdir(store.lineage) if entry.startswith(".staging-")]


def rewrite_manifest(generation: Generation, change: Callable[[dict[str, Any]], None]) -> None:
    path = Path(generation.path, "manifest.json")
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


# --- publishing ------------------------------------------------------------------------------
def test_the_first_publish_makes_gen_00000001_with_a_manifest_of_sizes_and_hashes(store: Store) -> None:
    generation = publish(store)
    assert generation.name == "gen-00000001"
    assert store.shown(generation.path) == os.path.join(store.lineage, "gen-00000001")
    manifest = json.loads(Path(generation.path, "manifest.json").read_text())
    assert manifest["generation"] == 1
    assert manifest["criu_version"] == CRIU_VERSION
    assert manifest["machine"] == os.uname().machine
    sha256 = {name: hashlib.sha256(data).hexdigest() for name, data in IMAGES.items()}
    assert manifest["files"] == {
        "core-1.img": {"size": len(IMAGES["core-1.img"]), "sha256": sha256["core-1.img"]},
        "mm-1.img": {"size": len(IMAGES["mm-1.img"]), "sha256": sha256["mm-1.img"]},
        # a page image is hashed in 16 MiB chunks, so that it can be verified on every core; this one is one chunk
        "pages-1.img": {"size": len(IMAGES["pages-1.img"]), "chunk_size": 16 << 20, "chunks": [sha256["pages-1.img"]]},
    }
    for name, data in IMAGES.items():
        assert Path(generation.path, name).read_bytes() == data
    assert staging_dirs(store) == [], "the staging directory became the generation"


def test_checkpoint_directories_are_0700_and_files_0600_though_criu_writes_0644(store: Store) -> None:
    store.open()
    generation = publish(store)
    store.claim(generation, "lease-token")
    store.reject(generation, "for the test")
    assert mode(store.lineage) == 0o700
    assert mode(store.logs) == 0o700
    assert mode(generation.path) == 0o700
    for name in os.listdir(generation.path):
        assert mode(os.path.join(generation.path, name)) == 0o600, name
    assert mode(os.path.join(store.lineage, "latest")) == 0o600


def test_open_tightens_a_lineage_that_already_exists_with_a_loose_mode(store: Store) -> None:
    os.makedirs(store.lineage, mode=0o755)
    os.chmod(store.lineage, 0o755)
    store.open()
    assert mode(store.lineage) == 0o700


def test_a_staging_directory_is_private_and_never_listed_as_a_generation(store: Store) -> None:
    with store.staging() as staging:
        assert mode(staging.path) == 0o700
        assert os.path.basename(staging.path).startswith(".staging-")
        Path(staging.path, "manifest.json").write_text("{}")
        assert store.generations() == []


def test_the_latest_pointer_names_the_newest_generation(store: Store) -> None:
    publish(store)
    assert Path(store.lineage, "latest").read_text() == "gen-00000001\n"
    publish(store)
    assert Path(store.lineage, "latest").read_text() == "gen-00000002\n"


def test_generation_numbers_increase_and_are_listed_newest_first(store: Store) -> None:
    numbers = [publish(store).number for _ in range(3)]
    assert numbers == [1, 2, 3]
    assert [g.number for g in store.generations()] == [3, 2, 1]


def test_a_number_is_never_reused_after_its_generation_was_deleted(store: Store) -> None:
    for _ in range(3):
        publish(store)
    for number in (1, 2, 3):
        shutil.rmtree(Path(store.lineage, f"gen-{number:08d}"))  # e.g. an operator cleaning the volume
    assert store.generations() == []
    assert publish(store).number == 4, "the pointer remembers the highest number"


def test_a_writer_with_a_stale_view_takes_the_next_free_number_instead_of_overwriting(store: Store) -> None:
    # Another writer's gen-00000001 that this writer cannot see yet (no manifest visible: NFS cache).
    taken = Path(store.lineage, "gen-00000001")
    taken.mkdir(parents=True)
    Path(taken, "pages-1.img").write_bytes(b"someone else's checkpoint")
    generation = publish(store)
    assert generation.number == 2
    assert Path(taken, "pages-1.img").read_bytes() == b"someone else's checkpoint"
    assert store.verify(generation, CRIU_VERSION)["generation"] == 2


def test_a_staging_block_that_raises_removes_its_directory(store: Store) -> None:
    with pytest.raises(RuntimeError, match="dump failed"), store.staging() as staging:
        Path(staging.path, "pages-1.img").write_bytes(b"half a dump")
        raise RuntimeError("dump failed")
    assert not os.path.exists(staging.path)
    assert staging_dirs(store) == []
    assert store.generations() == []


@pytest.mark.parametrize(
    ("failure", "words"),
    [(errno.ENOSPC, "full"), (errno.EROFS, "read-only"), (errno.EIO, "I/O error")],
    ids=["ENOSPC", "EROFS", "EIO"],
)
def test_a_failing_volume_at_publish_raises_store_error_and_leaves_no_staging_dir(
    store: Store, monkeypatch: pytest.MonkeyPatch, failure: int, words: str
) -> None:
    def failing_rename(source: str, target: str, **dir_fds: int) -> None:
        raise OSError(failure, os.strerror(failure))

    with store.staging() as staging:
        Path(staging.path, "pages-1.img").write_bytes(b"pages")
        monkeypatch.setattr(os, "rename", failing_rename)
        with pytest.raises(StoreError, match=words):
            store.publish(staging, {"criu_version": CRIU_VERSION})
        assert not os.path.exists(staging.path), "publish itself removes what it could not publish"
    monkeypatch.undo()
    assert staging_dirs(store) == []
    assert store.generations() == []
    assert not os.path.exists(os.path.join(store.lineage, "latest"))


def test_a_failure_after_the_rename_does_not_report_a_published_generation_as_failed(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Once renamed, a generation is restorable: reporting failure would make the supervisor stop
    the app gracefully while the replacement restores the state from before that stop."""

    def failing_pointer(number: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(store, "_write_pointer", failing_pointer)
    with store.staging() as staging:
        Path(staging.path, "pages-1.img").write_bytes(b"pages")
        generation = store.publish(staging, {"criu_version": CRIU_VERSION})
    assert [g.number for g in store.generations()] == [generation.number]
    assert "published, but updating the lineage afterwards failed" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only directory mode")
def test_a_read_only_lineage_directory_makes_staging_raise_store_error(store: Store) -> None:
    store.open()
    os.chmod(store.lineage, 0o500)
    try:
        with pytest.raises(StoreError, match="no permission"), store.staging():
            pass
    finally:
        os.chmod(store.lineage, 0o700)


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_publish_refuses_anything_but_regular_files(store: Store, tmp_path: Path, kind: str) -> None:
    with pytest.raises(StoreError, match="unexpected non-file"), store.staging() as staging:
        Path(staging.path, "pages-1.img").write_bytes(b"pages")
        if kind == "symlink":
            Path(staging.path, "core-1.img").symlink_to(tmp_path)
        else:
            Path(staging.path, "sub").mkdir()
        store.publish(staging, {"criu_version": CRIU_VERSION})
    assert staging_dirs(store) == []
    assert store.generations() == []


# --- verification ---------------------------------------------------------------------------
def test_an_intact_generation_verifies_and_returns_its_manifest(store: Store) -> None:
    generation = publish(store)
    store.claim(generation, "lease-token")  # bookkeeping files are not part of the checkpoint
    store.note(generation, "app-changed.json", "for the test")
    store.note(generation, "incompatible.json", "for the test")
    assert store.verify(generation, CRIU_VERSION)["generation"] == 1
    assert store.verify(generation)["generation"] == 1


def _truncate(generation: Generation) -> None:
    with open(os.path.join(generation.path, "pages-1.img"), "r+b") as image:
        image.truncate(100)


def _flip_a_byte(generation: Generation) -> None:
    path = Path(generation.path, "pages-1.img")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _delete_a_file(generation: Generation) -> None:
    Path(generation.path, "mm-1.img").unlink()


def _add_a_file(generation: Generation) -> None:
    Path(generation.path, "evil.img").write_bytes(b"not from CRIU")


def _name_a_path_outside(generation: Generation) -> None:
    # Outside the generation, a file whose content matches: only the path check can catch it.
    outside = Path(generation.path).parent / "x"
    outside.write_bytes(b"outside")
    entry = {"size": 7, "sha256": hashlib.sha256(b"outside").hexdigest()}
    rewrite_manifest(generation, lambda m: m["files"].update({"../x": entry}))


def _name_a_bookkeeping_file(generation: Generation) -> None:
    Path(generation.path, "claim.json").write_text("{}")
    entry = {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}
    rewrite_manifest(generation, lambda m: m["files"].update({"claim.json": entry}))


def _symlink_an_image(generation: Generation) -> None:
    # The link's target has exactly the right content: only the symlink check can catch it.
    path = Path(generation.path, "pages-1.img")
    target = Path(generation.path).parent / "elsewhere.img"
    target.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(target)


def _corrupt_the_manifest(generation: Generation) -> None:
    Path(generation.path, "manifest.json").write_text('{"format_version": 1, "files": {')


def _make_the_manifest_a_list(generation: Generation) -> None:
    Path(generation.path, "manifest.json").write_text("[1, 2]")


def _empty_the_file_list(generation: Generation) -> None:
    rewrite_manifest(generation, lambda m: m.update(files={}))


def _change_the_format(generation: Generation) -> None:
    rewrite_manifest(generation, lambda m: m.update(format_version=99))


def _claim_another_number(generation: Generation) -> None:
    rewrite_manifest(generation, lambda m: m.update(generation=7))


def _come_from_another_machine(generation: Generation) -> None:
    rewrite_manifest(generation, lambda m: m.update(machine="s390x" if os.uname().machine != "s390x" else "x86_64"))


def _forget_the_criu_version(generation: Generation) -> None:
    rewrite_manifest(generation, lambda m: m.pop("criu_version"))


DAMAGE = [
    (_truncate, "pages-1.img is 100 bytes, the manifest says 16384 (truncated?)"),
    (_flip_a_byte, "pages-1.img does not match its sha256"),
    (_delete_a_file, "mm-1.img is missing"),
    (_add_a_file, "files not in the manifest: evil.img"),
    (_name_a_path_outside, "unsafe path '../x'"),
    (_name_a_bookkeeping_file, "unsafe path 'claim.json'"),
    (_symlink_an_image, "pages-1.img is not a regular file"),
    (_corrupt_the_manifest, "manifest unreadable"),
    (_make_the_manifest_a_list, "manifest unreadable"),
    (_empty_the_file_list, "manifest lists no files"),
    (_change_the_format, "unknown manifest format 99"),
    (_claim_another_number, "manifest names generation 7"),
    (_come_from_another_machine, "made on"),
    (_forget_the_criu_version, "does not record the CRIU version"),
]


@pytest.mark.parametrize(("damage", "reason"), DAMAGE, ids=[d.__name__.strip("_") for d, _ in DAMAGE])
def test_a_damaged_generation_fails_verification_saying_why(
    store: Store, damage: Callable[[Generation], None], reason: str
) -> None:
    generation = publish(store)
    store.verify(generation, CRIU_VERSION)  # intact before the damage
    damage(generation)
    with pytest.raises(VerificationFailed) as caught:
        store.verify(generation, CRIU_VERSION)
    assert caught.value.message.startswith("gen-00000001")
    assert reason in caught.value.message


def test_a_symlinked_generation_directory_fails_verification(store: Store) -> None:
    real = publish(store)
    link = Path(store.lineage, "gen-00000002")
    link.symlink_to(real.path)
    with pytest.raises(VerificationFailed, match="is a symlink"):
        store.verify(Generation(2, str(link)), CRIU_VERSION)


def test_a_manifest_entry_that_is_not_an_object_fails_verification(store: Store) -> None:
    generation = publish(store)
    rewrite_manifest(generation, lambda m: m["files"].update({"pages-1.img": "16384"}))
    with pytest.raises(VerificationFailed, match="manifest entry for pages-1.img is malformed"):
        store.verify(generation, CRIU_VERSION)


@pytest.mark.parametrize(
    ("local", "restorable"),
    [("4.1", False), ("3.19", False), ("4.2", True), ("4.2.0", True), ("4.3", True), ("5.0", True)],
)
def test_restore_needs_the_same_or_a_newer_criu_than_the_dump(store: Store, local: str, restorable: bool) -> None:
    generation = publish(store, criu_version="4.2.1")
    if restorable:
        store.verify(generation, local)
    else:
        with pytest.raises(VerificationFailed, match=f"dumped by CRIU 4.2.1, but this image has CRIU {local}"):
            store.verify(generation, local)


# --- signed manifests (CKPT_SIGNING_KEY_FILE) ----------------------------------------------------
KEY = b"0123456789abcdef-signing-key"


def test_a_signed_generation_verifies_with_its_key(tmp_path: Path) -> None:
    signed = Store(str(tmp_path), "app", signing_key=KEY)
    generation = publish(signed)
    assert signed.verify(generation, CRIU_VERSION)["signature"]["algorithm"] == "hmac-sha256"


def test_a_consistently_rewritten_manifest_fails_the_signature(tmp_path: Path) -> None:
    signed = Store(str(tmp_path), "app", signing_key=KEY)
    generation = publish(signed)
    # Whoever can write the volume replaces an image and fixes its size and hash: only the key stops it.
    evil = b"attacker's pages"
    Path(generation.path, "pages-1.img").write_bytes(evil)
    entry = {"size": len(evil), "sha256": hashlib.sha256(evil).hexdigest()}
    rewrite_manifest(generation, lambda m: m["files"].update({"pages-1.img": entry}))
    Store(str(tmp_path), "app").verify(generation, CRIU_VERSION)  # passes without the key
    with pytest.raises(VerificationFailed, match="signature is wrong"):
        signed.verify(generation, CRIU_VERSION)


def test_with_a_key_an_unsigned_or_otherwise_signed_generation_is_refused(tmp_path: Path) -> None:
    unsigned = publish(Store(str(tmp_path), "app"))
    other = publish(Store(str(tmp_path), "app", signing_key=b"another key of 16+ bytes"))
    signed = Store(str(tmp_path), "app", signing_key=KEY)
    with pytest.raises(VerificationFailed, match="not signed"):
        signed.verify(unsigned, CRIU_VERSION)
    with pytest.raises(VerificationFailed, match="signature is wrong"):
        signed.verify(other, CRIU_VERSION)


def test_without_a_key_file_there_is_no_key(tmp_path: Path) -> None:
    assert read_signing_key(None) is None


def test_the_signing_key_is_read_without_its_trailing_newline(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")  # as `echo ... > key` or a Kubernetes secret leaves it
    assert read_signing_key(str(key_file)) == KEY


def test_a_missing_key_file_is_a_config_error_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"CKPT_SIGNING_KEY_FILE='.*/absent' cannot be read: No such file"):
        read_signing_key(str(tmp_path / "absent"))


def test_a_key_shorter_than_16_bytes_is_a_config_error_that_does_not_show_the_key(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"hunter2-secret\n")
    with pytest.raises(ConfigError, match="holds 14 bytes: use a key of at least 16 bytes") as caught:
        read_signing_key(str(key_file))
    assert "hunter2" not in caught.value.message


# --- claims and rejection ----------------------------------------------------------------------
def test_a_claim_records_its_lease_and_replaces_a_void_earlier_one(store: Store) -> None:
    # The lease, not the claim, keeps two copies from running: a claim found by a lease holder was made
    # by an earlier holder, which is gone, so a new claim replaces it and counts the attempt.
    generation = publish(store)
    assert store.read_claim(generation) is None
    first = store.claim(generation, "first-holder")
    assert (first.lease, first.attempt, first.resumed, first.ended) == ("first-holder", 1, None, None)
    second = store.claim(generation, "second-holder")
    assert (second.lease, second.attempt) == ("second-holder", 2)
    assert store.read_claim(generation) == second
    assert generation.read_json("claim.json")["lease"] == "second-holder"


def test_a_claim_says_whether_its_app_ran_and_whether_it_ended(store: Store) -> None:
    generation = publish(store)
    claim = store.claim(generation, "holder")
    resumed = store.mark_resumed(generation, claim)
    assert resumed.resumed is not None and store.read_claim(generation) == resumed
    store.mark_ended(generation, resumed, 3)
    ended = store.read_claim(generation)
    assert ended is not None and ended.ended is not None and ended.exit_code == 3


@pytest.mark.parametrize("content", ['{"time": "soon"}', '{"time": 1, "attempt": true}', '[1]',
                                     '{"time": 1, "lease": 5}', '{"time": 1, "exit_code": "0"}', "not json"])
def test_a_malformed_claim_is_a_named_refusal(store: Store, content: str) -> None:
    generation = publish(store)
    Path(generation.path, "claim.json").write_text(content)
    with pytest.raises(ValueError):
        store.read_claim(generation)


def test_a_volume_error_while_claiming_is_a_store_error(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    generation = publish(store)
    real_open = os.open

    def failing_open(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if "claim.json" in path:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    quota = "cannot claim gen-00000001: the checkpoint volume's quota is exhausted"
    with pytest.raises(StoreError, match=quota) as caught:
        store.claim(generation, "holder")
    assert isinstance(caught.value.__cause__, OSError)
    monkeypatch.undo()
    assert not generation.claimed


def test_reject_records_why_on_the_volume(store: Store) -> None:
    generation = publish(store)
    store.reject(generation, "pages-1.img does not match its sha256")
    assert generation.rejected
    record = generation.read_json("rejected.json")
    assert record["reason"] == "pages-1.img does not match its sha256"
    assert "host" in record


# --- retention -----------------------------------------------------------------------------------
def remaining(store: Store) -> list[int]:
    return [g.number for g in store.generations()]


def test_prune_keeps_the_newest_two_usable_generations(store: Store) -> None:
    for _ in range(4):
        publish(store)
    assert store.prune(keep=2) == ["gen-00000002", "gen-00000001"]
    assert remaining(store) == [4, 3]
    assert not os.path.exists(os.path.join(store.lineage, "gen-00000001"))


def test_prune_does_not_count_rejected_generations_as_kept(store: Store) -> None:
    for _ in range(4):
        publish(store)
    store.reject(Generation(4, os.path.join(store.lineage, "gen-00000004")), "corrupt")
    store.prune(keep=2)
    assert remaining(store) == [3, 2]


def test_prune_never_deletes_a_protected_generation(store: Store) -> None:
    for _ in range(4):
        publish(store)
    store.prune(keep=1, protect={1})
    assert remaining(store) == [4, 1]


def test_a_protected_newest_generation_counts_towards_keep(store: Store) -> None:
    # Regression: protect= used to be skipped before counting, so CKPT_KEEP=2 kept 3 after each checkpoint.
    for _ in range(4):
        publish(store)
    store.prune(keep=2, protect={4})
    assert remaining(store) == [4, 3]


def test_prune_spares_a_generation_a_restore_may_still_be_reading(store: Store) -> None:
    for _ in range(3):
        publish(store)
    oldest = store.generations()[-1]
    claim = store.claim(oldest, "holder")
    store.prune(keep=1)
    assert remaining(store) == [3, 1], "a recent claim not yet resumed means CRIU may be reading it"
    store.mark_resumed(oldest, claim)
    store.prune(keep=1)
    assert remaining(store) == [3]


def _make_staging(store: Store, name: str, files: list[str], age: float) -> Path:
    path = Path(store.lineage, f".staging-{name}")
    path.mkdir(parents=True)
    for file in files:
        Path(path, file).write_bytes(b"leftover")
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_clean_stale_staging_removes_only_old_staging_dirs(store: Store) -> None:
    crashed = _make_staging(store, "host-1-crashed", ["pages-1.img", "core-1.img"], age=7200)
    in_progress = _make_staging(store, "host-2-writing", ["pages-1.img"], age=10)
    generation = publish(store)
    assert store.clean_stale_staging() == [crashed.name]
    assert not crashed.exists()
    assert in_progress.exists()
    assert generation.has("manifest.json")


def test_clean_stale_staging_leaves_nfs_silly_rename_files_and_so_their_directory(store: Store) -> None:
    busy = _make_staging(store, "host-1-crashed", ["pages-1.img", ".nfs000000000123abcd00000001"], age=7200)
    assert store.clean_stale_staging() == []
    assert sorted(os.listdir(busy)) == [".nfs000000000123abcd00000001"]


def test_prune_also_cleans_stale_staging(store: Store) -> None:
    crashed = _make_staging(store, "host-1-crashed", ["pages-1.img"], age=7200)
    publish(store)
    assert crashed.name in store.prune(keep=2)
    assert not crashed.exists()


# --- incremental generations (a final dump against a parent, where soft-dirty tracking exists) -------
DIRTY_IMAGES = {"core-1.img": b"registers, later", "mm-1.img": b"memory map", "pages-1.img": b"only the dirty page"}


def publish_child(store: Store, parent: Generation, link: str | None = None) -> Generation:
    """What an incremental final dump publishes: its own images plus CRIU's `parent` link."""
    with store.staging() as staging:
        for name, data in DIRTY_IMAGES.items():
            Path(staging.path, name).write_bytes(data)
        Path(staging.path, "parent").symlink_to(link or f"../{parent.name}")
        return store.publish(staging, {"criu_version": CRIU_VERSION}, parent=parent)


def test_an_incremental_generation_names_its_parent_and_the_hash_of_the_parents_manifest(store: Store) -> None:
    parent = publish(store)
    child = publish_child(store, parent)

    manifest = store.verify(child, CRIU_VERSION)
    assert manifest["parent"] == {
        "generation": "gen-00000001",
        "manifest_sha256": hashlib.sha256(Path(parent.manifest_path).read_bytes()).hexdigest(),
    }
    assert "parent" not in manifest["files"], "the link is recorded as the parent, not as a file"
    assert os.readlink(os.path.join(child.path, "parent")) == "../gen-00000001"
    assert store.parent_of(child, manifest) == (parent, parent.read_json("manifest.json"))
    assert store.memory_bytes(child, manifest) == len(IMAGES["pages-1.img"]) + len(DIRTY_IMAGES["pages-1.img"])


def test_publishing_an_incremental_dump_without_its_link_publishes_nothing(store: Store) -> None:
    parent = publish(store)
    with pytest.raises(StoreError, match="lacks its link to gen-00000001"):
        publish_child(store, parent, link="../gen-00000099")
    assert remaining(store) == [1]
    assert staging_dirs(store) == []


def test_a_parent_link_in_a_full_generation_is_refused(store: Store) -> None:
    generation = publish(store)
    Path(generation.path, "parent").symlink_to("../gen-00000000")
    with pytest.raises(VerificationFailed, match="files not in the manifest: parent"):
        store.verify(generation, CRIU_VERSION)


def _delete_the_parent(child: Generation, parent: Generation) -> None:
    shutil.rmtree(parent.path)


def _republish_the_parent(child: Generation, parent: Generation) -> None:
    rewrite_manifest(parent, lambda manifest: manifest.update(created="another time"))


def _corrupt_a_parent_page(child: Generation, parent: Generation) -> None:
    path = Path(parent.path, "pages-1.img")
    path.write_bytes(b"X" + path.read_bytes()[1:])


def _point_the_link_elsewhere(child: Generation, parent: Generation) -> None:
    link = Path(child.path, "parent")
    link.unlink()
    link.symlink_to("/etc")


def _remove_the_link(child: Generation, parent: Generation) -> None:
    Path(child.path, "parent").unlink()


def _name_a_newer_parent(child: Generation, parent: Generation) -> None:
    rewrite_manifest(child, lambda manifest: manifest["parent"].update(generation="gen-00000009"))


def _give_the_parent_a_parent(child: Generation, parent: Generation) -> None:
    rewrite_manifest(parent, lambda manifest: manifest.update(parent={"generation": "gen-00000000"}))
    rewrite_manifest(child, lambda manifest: manifest["parent"].update(
        manifest_sha256=hashlib.sha256(Path(parent.manifest_path).read_bytes()).hexdigest()))


CHAIN_DAMAGE = [
    (_delete_the_parent, "its parent gen-00000001, which holds its unchanged pages, is missing"),
    (_republish_the_parent, "is not the checkpoint it was dumped against"),
    (_corrupt_a_parent_page, "gen-00000001: pages-1.img does not match its sha256"),
    (_point_the_link_elsewhere, "its link to the parent gen-00000001 is missing or wrong"),
    (_remove_the_link, "its link to the parent gen-00000001 is missing or wrong"),
    (_name_a_newer_parent, "malformed parent"),
    (_give_the_parent_a_parent, "chains deeper than one are never written"),
]


@pytest.mark.parametrize(("damage", "reason"), CHAIN_DAMAGE, ids=[d.__name__.strip("_") for d, _ in CHAIN_DAMAGE])
def test_an_incremental_generation_is_refused_when_its_parent_is_not_intact(
    store: Store, damage: Callable[[Generation, Generation], None], reason: str
) -> None:
    parent = publish(store)
    child = publish_child(store, parent)
    store.verify(child, CRIU_VERSION)
    damage(child, parent)
    with pytest.raises(VerificationFailed) as caught:
        store.verify(child, CRIU_VERSION)
    assert reason in caught.value.message


def test_a_lazy_restore_defers_the_parents_pages_too_and_verify_pages_catches_them(store: Store) -> None:
    parent = publish(store)
    child = publish_child(store, parent)
    _corrupt_a_parent_page(child, parent)

    manifest = store.verify(child, CRIU_VERSION, defer_pages=True)  # sizes only: the first answer is not held up
    with pytest.raises(VerificationFailed, match="gen-00000001: pages-1.img does not match its sha256") as caught:
        store.verify_pages(child, manifest)
    assert caught.value.generation == "gen-00000001", "the parent is at fault, and must be rejected too"


def test_a_damaged_parent_is_named_as_the_generation_at_fault(store: Store) -> None:
    parent = publish(store)
    child = publish_child(store, parent)
    _corrupt_a_parent_page(child, parent)
    with pytest.raises(VerificationFailed) as caught:
        store.verify(child, CRIU_VERSION)
    assert caught.value.generation == "gen-00000001"


def test_prune_keeps_the_parent_of_a_kept_incremental_generation(store: Store) -> None:
    parent = publish(store)
    publish_child(store, parent)

    assert store.prune(keep=1) == []
    assert remaining(store) == [2, 1], "gen-00000002's unchanged pages are in gen-00000001"


def test_prune_removes_a_parent_once_its_child_goes(store: Store) -> None:
    parent = publish(store)
    publish_child(store, parent)
    publish(store)
    publish(store)

    assert store.prune(keep=2) == ["gen-00000002", "gen-00000001"]
    assert remaining(store) == [4, 3]


def test_a_rejected_parent_is_kept_while_its_child_is(store: Store) -> None:
    parent = publish(store)
    child = publish_child(store, parent)
    store.reject(parent, "restoring gen-00000001 failed")  # e.g. an older restore attempt
    store.prune(keep=1)
    assert remaining(store) == [2, 1]
    store.verify(child, CRIU_VERSION)  # the rejection was about restoring the parent alone; the files are intact


def test_list_shows_an_incremental_generation_and_verify_checks_its_parent(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from supervisor_pkg import cli, criu

    monkeypatch.setattr(criu, "version", lambda: CRIU_VERSION)  # the image's CRIU, not this host's

    parent = publish(store)
    publish_child(store, parent)
    environment = {"CKPT_DIR": store.root, "CKPT_NAME": store.name}

    listed = CliRunner().invoke(cli.main, ["list"], env=environment)
    assert listed.exit_code == 0, listed.output
    assert "gen-00000002" in listed.output and "(incremental on gen-00000001)" in listed.output

    _corrupt_a_parent_page(Generation(2, ""), parent)
    verified = CliRunner().invoke(cli.main, ["verify", "2"], env=environment)
    assert verified.exit_code == 1
    assert "gen-00000002: FAIL gen-00000001: pages-1.img does not match its sha256" in verified.output


# --- page images hashed in chunks (verified on every core), in flight and after ----------------------
@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """4 KiB chunks, so that a few KiB of test data spans several (the real size is 16 MiB)."""
    monkeypatch.setattr(store_module, "PAGE_CHUNK", 4096)
    return 4096


def test_a_page_image_is_recorded_as_one_sha256_per_chunk(store: Store, small_chunks: int) -> None:
    data = os.urandom(3 * small_chunks + 100)
    generation = publish(store, {**IMAGES, "pages-1.img": data})
    entry = store.verify(generation, CRIU_VERSION)["files"]["pages-1.img"]
    pieces = [data[i:i + small_chunks] for i in range(0, len(data), small_chunks)]
    assert entry == {"size": len(data), "chunk_size": small_chunks,
                     "chunks": [hashlib.sha256(piece).hexdigest() for piece in pieces]}


def test_a_flipped_byte_in_any_chunk_fails_verification(store: Store, small_chunks: int) -> None:
    data = bytearray(os.urandom(3 * small_chunks))
    generation = publish(store, {**IMAGES, "pages-1.img": bytes(data)})
    data[2 * small_chunks + 5] ^= 0xFF  # in the last chunk
    Path(generation.path, "pages-1.img").write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match="pages-1.img does not match its sha256"):
        store.verify(generation, CRIU_VERSION)


def test_a_manifest_that_lies_about_the_chunk_size_is_refused(store: Store) -> None:
    generation = publish(store)
    rewrite_manifest(generation, lambda manifest: manifest["files"]["pages-1.img"].update(chunk_size=0))
    with pytest.raises(VerificationFailed, match="bad chunk size"):
        store.verify(generation, CRIU_VERSION, defer_pages=True)


def test_a_generation_written_before_chunks_whole_file_sha256_still_verifies(store: Store) -> None:
    generation = publish(store)
    data = IMAGES["pages-1.img"]
    rewrite_manifest(generation, lambda manifest: manifest.update(
        format_version=1, files={**manifest["files"], "pages-1.img": {
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))
    store.verify(generation, CRIU_VERSION)
    Path(generation.path, "pages-1.img").write_bytes(b"X" + data[1:])
    with pytest.raises(VerificationFailed, match="does not match its sha256"):
        store.verify(generation, CRIU_VERSION)


def test_the_page_hasher_follows_a_growing_image_to_the_same_chunks_as_hashing_it_afterwards(
    tmp_path: Path, small_chunks: int
) -> None:
    # As CRIU does: append in uneven pieces while the hasher follows, then stop; the rest is hashed in finish().
    image = tmp_path / "pages-1.img"
    data = os.urandom(5 * small_chunks + 1234)
    with PageHasher(str(tmp_path), poll=0.001) as hasher, open(image, "wb") as handle:
        for begin in range(0, len(data), 3000):
            handle.write(data[begin:begin + 3000])
            handle.flush()
            time.sleep(0.002)
        Path(tmp_path, "pages-2.img").write_bytes(data[:small_chunks])  # created after the last poll
        entries = hasher.finish()
    assert entries["pages-1.img"] == store_module.page_entry(*store_module.hash_chunks(str(image)))
    assert entries["pages-1.img"]["size"] == len(data) and len(entries["pages-1.img"]["chunks"]) == 6
    assert entries["pages-2.img"]["chunks"] == [hashlib.sha256(data[:small_chunks]).hexdigest()]


@pytest.mark.parametrize("size_in_chunks", [0.0, 1.0, 2.5])
def test_the_page_hasher_finishing_exactly_on_or_between_chunk_boundaries(
    tmp_path: Path, small_chunks: int, size_in_chunks: float
) -> None:
    data = os.urandom(int(size_in_chunks * small_chunks))
    Path(tmp_path, "pages-1.img").write_bytes(data)
    with PageHasher(str(tmp_path)) as hasher:
        entries = hasher.finish()
    assert entries["pages-1.img"] == store_module.page_entry(*store_module.hash_chunks(str(tmp_path / "pages-1.img")))


@pytest.mark.parametrize(("damage", "here_only"), [
    (_change_the_format, True), (_come_from_another_machine, True), (_flip_a_byte, False),
], ids=["newer format", "other machine", "corrupt"])
def test_a_generation_this_supervisor_cannot_read_is_refused_here_only(
    store: Store, damage: Callable[[Generation], None], here_only: bool
) -> None:
    generation = publish(store)
    damage(generation)
    with pytest.raises(VerificationFailed) as caught:
        store.verify(generation, CRIU_VERSION)
    assert caught.value.here_only is here_only


def test_a_newer_criu_is_refused_here_only(store: Store) -> None:
    generation = publish(store, criu_version="4.3")
    with pytest.raises(VerificationFailed, match="restore needs the same or a newer CRIU") as caught:
        store.verify(generation, "4.2.1")
    assert caught.value.here_only


def test_the_page_hasher_hashes_what_it_did_not_follow_on_every_core_when_finishing(
    tmp_path: Path, small_chunks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CRIU outran the hasher: it never polled (poll=60 s). finish() must hash it all, in pieces, in parallel.
    data = os.urandom(6 * small_chunks + 10)
    Path(tmp_path, "pages-1.img").write_bytes(data)
    ranges: list[tuple[int, int]] = []
    real_hash_range = store_module._hash_range

    def recording(fd: int, begin: int, end: int, digest: Any = None) -> str:
        ranges.append((begin, end))
        return real_hash_range(fd, begin, end, digest)

    monkeypatch.setattr(store_module, "_hash_range", recording)
    with PageHasher(str(tmp_path), poll=60) as hasher:
        entries = hasher.finish()
    assert sorted(ranges) == [(i * small_chunks, min(len(data), (i + 1) * small_chunks)) for i in range(7)], (
        "one piece per chunk, handed to the pool"
    )
    assert entries["pages-1.img"] == store_module.page_entry(*store_module.hash_chunks(str(tmp_path / "pages-1.img")))


# --- binding to the lineage --------------------------------------------------------------------------
def test_a_generation_copied_in_from_another_lineage_is_refused_even_when_signed(tmp_path: Path) -> None:
    key = b"k" * 32
    ticker = Store(str(tmp_path / "checkpoints"), "ticker", signing_key=key)
    kv = Store(str(tmp_path / "checkpoints"), "kv", signing_key=key)
    made = publish(ticker)
    kv.open()
    shutil.copytree(made.path, os.path.join(kv.lineage, made.name))
    copied = kv.generations()[0]
    with pytest.raises(VerificationFailed, match="made for the lineage 'ticker', not 'kv'") as caught:
        kv.verify(copied, CRIU_VERSION)
    assert not caught.value.here_only, "it can never be this lineage's: its own fault"
    assert ticker.verify(made, CRIU_VERSION)["lineage"] == "ticker"


def test_a_format_2_manifest_from_before_lineages_were_recorded_is_still_restorable(store: Store) -> None:
    generation = publish(store)

    def as_format_2(manifest: dict[str, Any]) -> None:
        manifest["format_version"] = 2
        del manifest["lineage"]

    rewrite_manifest(generation, as_format_2)
    assert store.verify(generation, CRIU_VERSION)["format_version"] == 2
