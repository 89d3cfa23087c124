"""Checkpoint triggers: each source only *requests*; the supervise loop decides.

A trigger runs in its own daemon thread (or, for signals, is the signal
handler) and hands the loop a `Notice` through the `post` callable it was
given. It never calls CRIU, never touches the store, and never raises out of
its thread: a metadata service that is unreachable, slow or answers garbage is
logged once per state change and retried with back-off.

Sources: sigterm (signals.py), aws, gcp, azure (cloud spot/preemption notices),
file (a request file on the volume), control (the local control socket,
`criu-supervisor checkpoint`), periodic (CKPT_INTERVAL).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("criu-supervisor")


@dataclasses.dataclass(frozen=True)
class Notice:
    """A request for a checkpoint.

    source:    "aws", "gcp", "azure", "file", "control", "periodic", ...
    final:     True when the machine is going away: checkpoint, then stop.
               False for a leave-running checkpoint (periodic, on demand).
    deadline:  wall-clock time (time.time() scale) when the machine vanishes,
               if the source announced one; None if unknown.
    detail:    one line for the log (e.g. "spot instance-action terminate at 12:02:00Z").
    early_warning: an advisory such as AWS's rebalance recommendation: worth a
               leave-running checkpoint, not a stop.
    on_published: called by the loop (in its thread) after a checkpoint that
               this notice asked for is published, with the generation name;
               e.g. Azure's StartRequests acknowledgement.
    on_failed: called with a reason if that checkpoint failed.
    """

    source: str
    final: bool
    deadline: float | None = None
    detail: str = ""
    early_warning: bool = False
    on_published: Callable[[str], None] | None = None
    on_failed: Callable[[str], None] | None = None

    def seconds_left(self, now: float | None = None) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - (time.time() if now is None else now)


Post = Callable[[Notice], None]


class Trigger(threading.Thread):
    """Base for polling triggers: `poll_once` is called every `interval` seconds.

    Subclasses implement `poll_once() -> Notice | None`. Exceptions from it are
    caught here, logged once per change of state, and retried with exponential
    back-off (capped at `max_backoff`); the next success logs recovery once.
    A trigger stops itself after posting a final notice.
    """

    source = "trigger"

    def __init__(self, post: Post, interval: float, max_backoff: float = 60.0) -> None:
        super().__init__(name=f"trigger-{self.source}", daemon=True)
        self.post = post
        self.interval = interval
        self.max_backoff = max_backoff
        self._stop_event = threading.Event()
        self._failing_reason: str | None = None

    def poll_once(self) -> Notice | None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop_event.set()

    @property
    def stopped(self) -> bool:
        return self._stop_event.is_set()

    def run(self) -> None:
        delay = 0.0
        while not self._stop_event.wait(delay):
            try:
                notice = self.poll_once()
            except Exception as error:  # noqa: BLE001 - a trigger must never die of a bad answer
                reason = f"{type(error).__name__}: {error}"
                if self._failing_reason is None:
                    log.warning("%s trigger: %s; retrying with back-off, other triggers keep working",
                                self.source, reason)
                self._failing_reason = reason
                delay = min(self.max_backoff, max(self.interval, delay * 2 or self.interval))
                continue
            if self._failing_reason is not None:
                log.info("%s trigger works again", self.source)
                self._failing_reason = None
            delay = self.interval
            if notice is not None:
                self.post(notice)
                if notice.final:
                    return


CLOUD_SOURCES = frozenset({"aws", "gcp", "azure"})


@dataclasses.dataclass
class ActiveTriggers:
    """The sources that are running, and how to stop them."""

    names: list[str]
    stoppers: list[Callable[[], None]]

    def stop(self) -> None:
        for stop in self.stoppers:
            try:
                stop()
            except Exception as error:  # noqa: BLE001 - stopping must never fail the exit path
                log.debug("stopping a trigger failed: %s", error)
        self.stoppers.clear()


def start_all(config: Any, lineage: str, post: Callable[[object], None]) -> ActiveTriggers:
    """Start every source named in CKPT_TRIGGERS; one that cannot start is logged and skipped."""
    active = ActiveTriggers(names=[], stoppers=[])
    wanted = list(config.triggers)
    if "auto" in wanted:
        wanted.remove("auto")
        from supervisor_pkg.triggers.detect import detect_cloud

        cloud = detect_cloud(urls={"aws": config.aws_metadata_url, "gcp": config.gcp_metadata_url,
                                   "azure": config.azure_metadata_url})
        if cloud and cloud not in wanted:
            log.info("detected %s: watching its interruption notices", cloud)
            wanted.append(cloud)
    for name in wanted:
        try:
            stopper = _start_one(name, config, lineage, post)
        except Exception as error:  # noqa: BLE001 - one broken source must not stop the others
            log.warning("%s trigger not started: %s", name, error)
            continue
        active.names.append(name)
        if stopper is not None:
            active.stoppers.append(stopper)
    if config.interval > 0 and "periodic" not in active.names:
        active.names.append("periodic")
    return active


def _start_one(name: str, config: Any, lineage: str, post: Callable[[object], None]) -> Callable[[], None] | None:
    if name in ("sigterm", "periodic"):
        return None  # handled by the supervise loop itself
    if name == "control":
        from supervisor_pkg.control import ControlServer

        server = ControlServer(config.control_socket, post)
        server.start()
        return server.close
    if name == "file":
        from supervisor_pkg.triggers.file import FileTrigger

        watcher = FileTrigger(post, lineage)
        watcher.start()
        return watcher.stop
    poller: Trigger
    if name == "aws":
        from supervisor_pkg.triggers.aws import AwsTrigger

        poller = AwsTrigger(post, base_url=config.aws_metadata_url, interval=config.poll_interval)
    elif name == "gcp":
        from supervisor_pkg.triggers.gcp import GcpTrigger

        # A 30 s notice: poll at least every second (GCP's hanging GET sets the pace anyway).
        poller = GcpTrigger(post, base_url=config.gcp_metadata_url, interval=min(config.poll_interval, 1.0))
    elif name == "azure":
        from supervisor_pkg.triggers.azure import AzureTrigger

        poller = AzureTrigger(post, base_url=config.azure_metadata_url, interval=min(config.poll_interval, 1.0))
    else:
        raise ValueError(f"unknown trigger {name!r}")
    poller.start()
    return poller.stop
