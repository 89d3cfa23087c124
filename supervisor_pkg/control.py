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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from supervisor_pkg.errors import SupervisorError

DEFAULT_SOCKET = "/run/criu-supervisor.sock"
_MAX_REQUEST = 64 * 1024
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
    def __init__(self, path: str, post: Callable[[ControlRequest], None], reply_timeout: float = 600.0) -> None:
        super().__init__(name="control-socket", daemon=True)
        self.path = path
        self.post = post
        self.reply_timeout = reply_timeout
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        old_umask = os.umask(0o177)
        try:
            self._socket.bind(path)
        finally:
            os.umask(old_umask)
        self._socket.listen(8)

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
            os.unlink(self.path)


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
