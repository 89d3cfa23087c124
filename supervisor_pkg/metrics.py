"""What the loop reports: counters and histograms, in Prometheus' text format.

Served on CKPT_METRICS_ADDRESS:CKPT_METRICS_PORT (off by default) at /metrics.
The format is small and stable
(https://prometheus.io/docs/instrumenting/exposition_formats/), so it is
written here rather than adding a dependency to every app image.

The metrics port shares the container's network namespace with the app: bound
first by the supervisor, the app's own port makes the app (or CRIU restoring
its listening socket) fail with EADDRINUSE. `listening_ports` and
`metrics_port_conflict` let the supervisor refuse such a port before binding.
"""

from __future__ import annotations

import errno
import re
import socket
import threading
from collections import defaultdict
from typing import TYPE_CHECKING

from supervisor_pkg.errors import ConfigError

if TYPE_CHECKING:  # http.server costs ~13 ms of start-up: imported only when serving
    from http.server import ThreadingHTTPServer

BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[index] += 1
        self.total += value
        self.count += 1


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    escaped = (f'{key}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for key, value in pairs)
    return "{" + ",".join(escaped) + "}" if pairs else ""


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.checkpoints: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.restores: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.checkpoint_seconds: dict[tuple[tuple[str, str], ...], Histogram] = defaultdict(Histogram)
        self.restore_seconds = Histogram()
        self.bytes_written = 0
        self.last_checkpoint_time = 0.0
        self.state = "starting"

    def checkpoint(self, trigger: str, final: bool, ok: bool, seconds: float, size: int = 0, when: float = 0.0) -> None:
        kind = "final" if final else "leave-running"
        with self._lock:
            self.checkpoints[(("trigger", trigger), ("kind", kind), ("result", "success" if ok else "failure"))] += 1
            if ok:
                self.checkpoint_seconds[(("kind", kind),)].observe(seconds)
                self.bytes_written += size
                self.last_checkpoint_time = when

    def restore(self, ok: bool, seconds: float = 0.0) -> None:
        with self._lock:
            self.restores[(("result", "success" if ok else "failure"),)] += 1
            if ok:
                self.restore_seconds.observe(seconds)

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP criu_supervisor_checkpoints_total Checkpoints attempted, by trigger, kind and result.",
                "# TYPE criu_supervisor_checkpoints_total counter",
                *(f"criu_supervisor_checkpoints_total{_labels(k)} {v}" for k, v in sorted(self.checkpoints.items())),
                "# HELP criu_supervisor_restores_total Restores attempted, by result.",
                "# TYPE criu_supervisor_restores_total counter",
                *(f"criu_supervisor_restores_total{_labels(k)} {v}" for k, v in sorted(self.restores.items())),
                "# HELP criu_supervisor_checkpoint_bytes_total Bytes of published checkpoints.",
                "# TYPE criu_supervisor_checkpoint_bytes_total counter",
                f"criu_supervisor_checkpoint_bytes_total {self.bytes_written}",
                "# HELP criu_supervisor_last_checkpoint_timestamp_seconds When the last checkpoint was published.",
                "# TYPE criu_supervisor_last_checkpoint_timestamp_seconds gauge",
                f"criu_supervisor_last_checkpoint_timestamp_seconds {self.last_checkpoint_time}",
                "# HELP criu_supervisor_up_state 1 for the supervisor's current state.",
                "# TYPE criu_supervisor_up_state gauge",
                f'criu_supervisor_up_state{{state="{self.state}"}} 1',
            ]
            lines += _histogram("criu_supervisor_checkpoint_duration_seconds",
                                "Time from the request to a published checkpoint.", self.checkpoint_seconds)
            lines += _histogram("criu_supervisor_restore_duration_seconds",
                                "Time CRIU took to restore (after verification).", {(): self.restore_seconds})
        return "\n".join(lines) + "\n"


def _histogram(name: str, help_text: str, series: dict[tuple[tuple[str, str], ...], Histogram]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for labels, histogram in sorted(series.items()):
        for bound, count in zip(BUCKETS, histogram.counts, strict=True):
            lines.append(f"{name}_bucket{_labels((*labels, ('le', f'{bound:g}')))} {count}")
        lines.append(f"{name}_bucket{_labels((*labels, ('le', '+Inf')))} {histogram.count}")
        lines.append(f"{name}_sum{_labels(labels)} {histogram.total}")
        lines.append(f"{name}_count{_labels(labels)} {histogram.count}")
    return lines


# One socket of /proc/net/tcp or /proc/net/tcp6 (proc(5)): "sl: local_address rem_address st ...", addresses
# as hex IP:port (8 hex digits for IPv4, 32 for IPv6), st the state in hex.
_PROC_NET_TCP_LINE = re.compile(
    r"\s*\d+:\s+(?:[0-9A-Fa-f]{8}|[0-9A-Fa-f]{32}):([0-9A-Fa-f]{4})\s+[0-9A-Fa-f]+:[0-9A-Fa-f]{4}\s+([0-9A-Fa-f]{2})\s"
)
_TCP_LISTEN = 0x0A  # TCP_LISTEN, include/net/tcp_states.h


def listening_ports(proc_net_tcp_texts: list[str]) -> set[int]:
    """The TCP ports in LISTEN state in the given texts of /proc/net/tcp and /proc/net/tcp6 (any address)."""
    ports = set()
    for text in proc_net_tcp_texts:
        for line in text.splitlines():
            match = _PROC_NET_TCP_LINE.match(line)  # the header line and anything malformed do not match
            if match and int(match.group(2), 16) == _TCP_LISTEN and int(match.group(1), 16) != 0:
                ports.add(int(match.group(1), 16))
    return ports


def read_listening_ports(net_directory: str = "/proc/self/net") -> set[int]:
    """The TCP ports listened on now in the network namespace of `net_directory` (/proc/PID/net for the app's).

    A missing or unreadable file counts as no ports: tcp6 is absent when IPv6 is disabled.
    """
    texts = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{net_directory}/{name}", encoding="ascii", errors="replace") as file:
                texts.append(file.read())
        except OSError:
            continue
    return listening_ports(texts)


def metrics_port_conflict(port: int, app_ports: set[int]) -> str | None:
    """One line refusing CKPT_METRICS_PORT if it is one of the app's ports, else None.

    `app_ports`: the ports the app listened on at its last checkpoint (restoring
    it needs them free) and the ports listened on now.
    """
    if port == 0 or port not in app_ports:
        return None
    return (f"CKPT_METRICS_PORT={port} is the app's own port (it listened on it in the last checkpoint / it listens "
            "on it now): choose another port")


_BIND_HINTS = {
    errno.EADDRINUSE: "another process listens on it",
    errno.EACCES: "ports below 1024 need CAP_NET_BIND_SERVICE",
    errno.EADDRNOTAVAIL: "CKPT_METRICS_ADDRESS is not an address of this container",
    errno.EAFNOSUPPORT: "IPv6 is disabled here",
}


def serve(metrics: Metrics, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics in a daemon thread; returns the server (call shutdown() to stop).

    Raises ConfigError, one line naming the port and the cause, if the port cannot be bound.
    """
    import socketserver
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

        def server_bind(self) -> None:
            # HTTPServer.server_bind also looks up socket.getfqdn(host): a reverse DNS query that can hang the
            # start on a container's resolver, for a name nothing here uses.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    try:
        server = Server((host, port), Handler)
    except OSError as error:
        hint = _BIND_HINTS.get(error.errno or 0)
        cause = (error.strerror or str(error)) + (f", {hint}" if hint else "")
        shown = f"[{host}]" if ":" in host else host
        raise ConfigError(f"CKPT_METRICS_PORT={port}: cannot serve metrics on {shown}:{port} ({cause}): choose "
                          "another port or CKPT_METRICS_ADDRESS, or set CKPT_METRICS_PORT=0") from error
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
