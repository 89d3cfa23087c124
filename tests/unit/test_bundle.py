"""The drop-in bundle's plumbing: how its programs are named and run, and the app's environment.

The bundle itself (images/bundle/assemble.sh) is exercised for real in
tests/integration/test_drop_in.py; these are the decisions around it.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import sys
from pathlib import Path

import pytest

from supervisor_pkg import bundle, criu, launcher
from supervisor_pkg.signals import HANDLED_SIGNALS


def make_bundle(root: Path) -> Path:
    """The layout assemble.sh leaves: bin/ (static, links to the shim), lib/ with the loader and programs/."""
    for directory in ("bin", "lib/programs", "libexec"):
        (root / directory).mkdir(parents=True)
    (root / "lib" / bundle.LOADER_NAME).write_bytes(b"\x7fELF")
    for name in ("criu", "python3.13"):
        (root / "lib" / "programs" / name).write_bytes(b"\x7fELF")
        (root / "libexec" / name).symlink_to(f"../lib/{bundle.LOADER_NAME}")
    for name in ("tini", "criu-supervisor-shim"):
        (root / "bin" / name).write_bytes(b"\x7fELF")
    for name in ("python3", "criu", "criu-supervisor"):
        (root / "bin" / name).symlink_to("criu-supervisor-shim")
    return root


@pytest.fixture(name="bundled")
def bundled_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_bundle(tmp_path / "opt" / "criu-supervisor")
    monkeypatch.setattr(sys, "executable", str(root / "bin" / "python3"))
    bundle.root.cache_clear()
    yield root
    bundle.root.cache_clear()


def test_outside_a_bundle_programs_are_looked_up_on_path() -> None:
    bundle.root.cache_clear()
    assert bundle.root() is None  # the test venv's Python
    assert bundle.program("criu") == ["criu"]
    assert bundle.program("tini", static=True) == ["tini"]


def test_in_a_bundle_criu_runs_through_its_own_loader_under_its_own_name(bundled: Path) -> None:
    assert bundle.root() == str(bundled)
    assert bundle.program("criu") == [
        str(bundled / "libexec" / "criu"), "--library-path", str(bundled / "lib"), "--argv0", "criu",
        str(bundled / "lib" / "programs" / "criu")]


def test_in_a_bundle_a_static_program_runs_directly(bundled: Path) -> None:
    assert bundle.program("tini", static=True) == [str(bundled / "bin" / "tini")]


def test_a_program_the_bundle_lacks_is_looked_up_on_path(bundled: Path) -> None:
    assert bundle.program("iptables") == ["iptables"]


def test_a_directory_without_the_loader_is_not_a_bundle(bundled: Path) -> None:
    os.unlink(bundled / "lib" / bundle.LOADER_NAME)
    bundle.root.cache_clear()
    assert bundle.root() is None


def test_the_app_gets_the_environment_we_were_started_with_not_what_python_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = tmp_path / "environ"
    block.write_bytes(b"PATH=/usr/bin\0HOME=/root\0EMPTY=\0A=1=2\0DUP=first\0DUP=second\0no-equals\0=nameless\0"
                      b"RAW=\xff\0")
    monkeypatch.setenv("LC_CTYPE", "C.UTF-8")  # what PEP 538's coercion does to os.environ
    environment = launcher.environment_at_start(str(block))
    assert environment == {"PATH": "/usr/bin", "HOME": "/root", "EMPTY": "", "A": "1=2", "DUP": "first",
                           "RAW": os.fsdecode(b"\xff")}
    assert "LC_CTYPE" not in environment


def test_without_proc_the_environment_is_ours(tmp_path: Path) -> None:
    assert launcher.environment_at_start(str(tmp_path / "missing")) == dict(os.environ)


def test_an_image_without_tmp_gets_one_for_criu(tmp_path: Path) -> None:
    made, message = criu.ensure_tmp(str(tmp_path / "tmp")) or (None, "")
    assert made is True and "made" in message
    assert stat.S_IMODE(os.stat(tmp_path / "tmp").st_mode) == 0o1777
    assert criu.ensure_tmp(str(tmp_path / "tmp")) is None  # there now: nothing to do


def test_a_tmp_that_cannot_be_made_is_said_with_the_fix(tmp_path: Path) -> None:
    made, message = criu.ensure_tmp(str(tmp_path / "missing-parent" / "tmp")) or (None, "")
    assert made is False
    assert "every checkpoint will fail" in message and "--tmpfs" in message


def test_the_shim_blocks_exactly_the_signals_the_supervisor_handles() -> None:
    """shim.c keeps them pending until the handlers exist: a signal missing there would be lost at start-up."""
    source = (Path(__file__).resolve().parents[2] / "images" / "base" / "shim.c").read_text()
    listed = re.search(r"static const int handled\[\] = \{([^}]*)\}", source)
    assert listed is not None, "shim.c no longer lists its blocked signals as `handled[]`"
    in_shim = {getattr(signal, name.strip()) for name in listed.group(1).split(",")}
    assert in_shim == set(HANDLED_SIGNALS)
