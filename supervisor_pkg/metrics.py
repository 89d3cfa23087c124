"""What the loop reports: counters and histograms, in Prometheus' text format.

Served on CKPT_METRICS_PORT (off by default) at /metrics. The format is small
and stable (https://prometheus.io/docs/instrumenting/exposition_formats/), so
it is written here rather than adding a dependency to every app image.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import TYPE_CHECKING

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


def serve(metrics: Metrics, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics in a daemon thread; returns the server (call shutdown() to stop)."""
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

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
