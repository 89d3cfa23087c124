"""The local control socket: `criu-supervisor checkpoint` and `status` via `docker exec`.

One JSON object per connection each way:
    -> {"command": "checkpoint", "leave_running": true}
    <- {"ok": true, "generation": "gen-00000004", "seconds": 0.21}
    -> {"command": "status"}
    <- {"ok": true, "status": {...}}

The socket lives in the container (default /run/criu-supervisor.sock, mode
0600, root only), never on the shared volume. The server thread only turns a
request into an event for the supervise loop and waits for the loop's reply,
so a checkpoint asked for here is serialised with every other trigger.

CKPT_CONTROL_SOCKET is a setting, so it may name anything: the socket is only
created where nothing exists (bind() itself never replaces a file: EADDRINUSE),
or over a socket proven dead (connect() refused: a supervisor that died before
unlinking it), and a missing directory for it is created 0700. A regular file,
a link, a directory or a live socket there is refused with a ConfigError, and
unlinked never: `CKPT_CONTROL_SOCKET=/etc/passwd` once replaced /etc/passwd.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

from supervisor_pkg.errors import ConfigError, SupervisorError

DEFAULT_SOCKET = "/run/criu-supervisor.sock"
_MAX_REQUEST = 64 * 1024
_PROBE_TIMEOUT = 1.0  # a live server's backlog may be full: no answer within this is not proof of death
log = logging.getLogger("criu-supervisor")


@dataclasses.dataclass
class ControlRequest:
    """A request waiting for the loop's answer."""

    command: str
    arguments: dict[str, Any]
    _done: threading.Event = dataclasses.field(default_factory=threading.Event)
    _reply: dict[str, Any] = dataclasses.field(default_factory=dict)

    def answer(self, reply: dict[str, Any]) -> None:
        if not self._done.is_set():
            self._reply = reply
            self._done.set()

    def wait(self, timeout: float) -> dict[str, Any]:
        if not self._done.wait(timeout):
            return {"ok": False, "error": f"no answer from the supervisor within {timeout:.0f} s"}
        return self._reply


class ControlServer(threading.Thread):
    """Serves the control socket; raises ConfigError if it cannot be created safely at `path` (see above)."""

    def __init__(self, path: str, post: Callable[[ControlRequest], None], reply_timeout: float = 600.0) -> None:
        super().__init__(name="control-socket", daemon=True)
        self.path = path
        self.post = post
        self.reply_timeout = reply_timeout
        stale = _occupant(path)
        if stale is None:
            _make_directory(path)
        else:
            _remove_stale(path, stale)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self._socket.bind(path)
            self._socket.listen(8)
            created = os.lstat(path)
        except OSError as error:
            self._socket.close()
            why = ("something was created there meanwhile" if error.errno == errno.EADDRINUSE
                   else error.strerror or str(error))
            raise ConfigError(f"CKPT_CONTROL_SOCKET={path!r}: cannot create the control socket ({why}): "
                              "choose another path") from error
        finally:
            os.umask(old_umask)
        self._identity = (created.st_dev, created.st_ino)

    def run(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            try:
                request = json.loads(_read_all(connection))
                if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                    raise ValueError("expected a JSON object with a 'command'")
            except ValueError as error:
                connection.sendall(json.dumps({"ok": False, "error": f"bad request: {error}"}).encode())
                return
            pending = ControlRequest(request["command"], {k: v for k, v in request.items() if k != "command"})
            self.post(pending)
            connection.sendall(json.dumps(pending.wait(self.reply_timeout)).encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.close()
        with contextlib.suppress(OSError):
            now = os.lstat(self.path)
            if (now.st_dev, now.st_ino) == self._identity:  # ours still, not something put there since
                os.unlink(self.path)


def check_socket_path(path: str) -> None:
    """Raise ConfigError unless the control socket can be created at `path`; changes nothing.

    For the start, before anything runs: ControlServer checks again when it
    binds (the path may change in between), and removes a dead socket then.
    """
    if _occupant(path) is None:
        _nearest_directory(path)


def _occupant(path: str) -> os.stat_result | None:
    """None if nothing is at `path`; the lstat() of a dead socket there; ConfigError for anything else."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as error:  # ENOTDIR (a parent is a file), EACCES, ELOOP...
        raise ConfigError(f"CKPT_CONTROL_SOCKET={path!r} cannot be used: {error.strerror}: choose another "
                          "path, e.g. /run/criu-supervisor.sock") from error
    if not stat.S_ISSOCK(status.st_mode):
        raise ConfigError(f"CKPT_CONTROL_SOCKET={path!r} is {_kind(status.st_mode)}: the control socket is only "
                          "created where nothing exists, or over a dead socket; choose another path, e.g. "
                          "/run/criu-supervisor.sock")
    why_alive = _why_alive(path)
    if why_alive:
        raise ConfigError(f"CKPT_CONTROL_SOCKET={path!r} is a socket that {why_alive}: is another supervisor "
                          "running in this container? Stop it, or choose another path")
    return status


def _why_alive(path: str) -> str | None:
    """None if connect() is refused (nobody listens: the socket is dead), else what happened instead."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # ECONNREFUSED: bound by a process that is gone; ENOENT: removed meanwhile
        except TimeoutError:
            return f"did not answer within {_PROBE_TIMEOUT:g} s (a busy live server)"
        except OSError as error:
            return f"could not be probed ({error.strerror or error}), so it cannot be proven dead"
    return "a live process accepts connections on"


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a socket"


def _nearest_directory(path: str) -> str:
    """The nearest existing ancestor of `path`, which must be a directory (ConfigError otherwise)."""
    ancestor = os.path.dirname(path) or "/"
    while True:
        try:
            status = os.stat(ancestor)  # follows links: /var/run -> /run is usual
        except FileNotFoundError:
            ancestor = os.path.dirname(ancestor)
            continue
        except OSError as error:
            raise ConfigError(f"CKPT_CONTROL_SOCKET={path!r} cannot be used: {ancestor}: {error.strerror}: "
                              "choose another path") from error
        if not stat.S_ISDIR(status.st_mode):
            raise ConfigError(f"CKPT_CONTROL_SOCKET={path!r} cannot be used: {ancestor} is {_kind(status.st_mode)}, "
                              "not a directory: choose another path")
        return ancestor


def _make_directory(path: str) -> None:
    """Create the socket's missing directories, the last one 0700: then it is a directory of our own."""
    _nearest_directory(path)
    try:
        os.makedirs(os.path.dirname(path) or "/", mode=0o700, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"CKPT_CONTROL_SOCKET={path!r}: cannot create its directory ({error.strerror}): "
                          "choose another path") from error


def _remove_stale(path: str, stale: os.stat_result) -> None:
    """Unlink the dead socket `stale`, unless something else has been put at `path` since it was probed."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise ConfigError(f"CKPT_CONTROL_SOCKET={path!r} cannot be used: {error.strerror}") from error
    if (now.st_dev, now.st_ino) != (stale.st_dev, stale.st_ino) or not stat.S_ISSOCK(now.st_mode):
        raise ConfigError(f"CKPT_CONTROL_SOCKET={path!r} changed while it was checked: choose another path")
    log.info("replacing the dead control socket %s (left by a supervisor that is gone)", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise ConfigError(f"CKPT_CONTROL_SOCKET={path!r}: cannot remove the dead socket there "
                          f"({error.strerror}): choose another path") from error


def _read_all(connection: socket.socket) -> bytes:
    chunks = []
    size = 0
    while chunk := connection.recv(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_REQUEST:
            raise ValueError("request too large")
    return b"".join(chunks)


def call(path: str, request: dict[str, Any], timeout: float = 660.0) -> dict[str, Any]:
    """Client side: send one request, return the reply. Raises SupervisorError if nobody answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            client.connect(path)
            client.sendall(json.dumps(request).encode())
            client.shutdown(socket.SHUT_WR)
            reply = json.loads(_read_all(client) or b"{}")
    except (OSError, ValueError) as error:
        raise SupervisorError(
            f"cannot reach the supervisor at {path} ({error}); run this inside the container "
            "(docker exec CONTAINER criu-supervisor ...)"
        ) from error
    if not isinstance(reply, dict):
        raise SupervisorError(f"unexpected answer from the supervisor: {reply!r}")
    return reply
