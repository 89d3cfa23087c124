"""control: the socket is created only where nothing exists, or over a dead socket; a round trip works."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor_pkg import control
from supervisor_pkg.control import ControlRequest, ControlServer
from supervisor_pkg.errors import ConfigError


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: pytest's tmp_path can exceed sun_path's 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ctl", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _answer(request: ControlRequest) -> None:
    request.answer({"ok": True, "command": request.command})


def _serve(path: Path) -> ControlServer:
    server = ControlServer(str(path), _answer, reply_timeout=5)
    server.start()
    return server


def _dead_socket(path: Path) -> None:
    """A socket file nobody listens on: what a supervisor killed before close() leaves behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))


def _refused(path: Path, *words: str) -> None:
    """Both the server and the check at start refuse `path`, in the same one line."""
    with pytest.raises(ConfigError) as caught:
        ControlServer(str(path), _answer)
    assert caught.value.message.startswith(f"CKPT_CONTROL_SOCKET={str(path)!r}")
    assert "\n" not in caught.value.message
    for word in words:
        assert word in caught.value.message
    with pytest.raises(ConfigError) as caught_again:
        control.check_socket_path(str(path))
    assert caught_again.value.message == caught.value.message


# --- where the socket may be created -----------------------------------------------------------------------
def test_where_nothing_exists_the_socket_is_created_mode_0600_and_answers(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    control.check_socket_path(str(path))
    server = _serve(path)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.lstat(path).st_mode)
        assert control.call(str(path), {"command": "status"}, timeout=5) == {"ok": True, "command": "status"}
    finally:
        server.close()
    assert not path.exists()


def test_a_missing_directory_is_created_0700_a_directory_of_our_own(short_dir: Path) -> None:
    path = short_dir / "criu-supervisor" / "control.sock"
    control.check_socket_path(str(path))
    assert not path.parent.exists()  # the check changes nothing
    server = _serve(path)
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert control.call(str(path), {"command": "status"}, timeout=5)["ok"] is True
    finally:
        server.close()


def test_a_dead_socket_left_by_a_killed_supervisor_is_replaced(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    _dead_socket(path)
    control.check_socket_path(str(path))
    server = _serve(path)
    try:
        assert control.call(str(path), {"command": "status"}, timeout=5)["ok"] is True
    finally:
        server.close()


# --- what is refused, and left alone -----------------------------------------------------------------------
def test_a_regular_file_is_refused_and_left_intact(short_dir: Path) -> None:
    # Red team: CKPT_CONTROL_SOCKET=/etc/passwd replaced /etc/passwd with a socket.
    path = short_dir / "passwd"
    path.write_text("root:x:0:0:root:/root:/bin/sh\n")
    _refused(path, "is a regular file", "only created where nothing exists")
    assert path.read_text() == "root:x:0:0:root:/root:/bin/sh\n"


def test_a_symbolic_link_is_refused_and_neither_it_nor_its_target_is_touched(short_dir: Path) -> None:
    target = short_dir / "target"
    target.write_text("precious")
    link = short_dir / "control.sock"
    link.symlink_to(target)
    _refused(link, "is a symbolic link")
    assert link.is_symlink() and target.read_text() == "precious"


def test_a_symbolic_link_to_a_dead_socket_is_refused_too(short_dir: Path) -> None:
    dead = short_dir / "dead.sock"
    _dead_socket(dead)
    link = short_dir / "control.sock"
    link.symlink_to(dead)
    _refused(link, "is a symbolic link")
    assert link.is_symlink() and stat.S_ISSOCK(os.lstat(dead).st_mode)


def test_a_directory_is_refused_and_left_intact(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    path.mkdir()
    (path / "inside").write_text("x")
    _refused(path, "is a directory")
    assert (path / "inside").read_text() == "x"


def test_a_named_pipe_is_refused(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    os.mkfifo(path)
    _refused(path, "is a named pipe")
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


def test_the_live_socket_of_another_process_is_refused_and_keeps_working(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(8)
        _refused(path, "a live process accepts connections on", "another supervisor")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # still there, still the other process's


def test_a_path_under_a_regular_file_is_refused_in_one_line(short_dir: Path) -> None:
    parent = short_dir / "file"
    parent.write_text("x")
    _refused(parent / "control.sock", "cannot be used")
    assert parent.read_text() == "x"


def test_a_missing_directory_under_a_regular_file_is_refused_in_one_line(short_dir: Path) -> None:
    parent = short_dir / "file"
    parent.write_text("x")
    with pytest.raises(ConfigError, match="cannot be used"):
        ControlServer(str(parent / "missing" / "control.sock"), _answer)


def test_closing_removes_only_our_own_socket(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    server = _serve(path)
    os.unlink(path)
    path.write_text("put here since")
    server.close()
    assert path.read_text() == "put here since"


def test_a_socket_path_too_long_for_sun_path_is_a_config_error_not_a_traceback(short_dir: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create the control socket"):
        ControlServer(str(short_dir / ("s" * 120)), _answer)
