"""The lease on a lineage: one running instance per app, handed over on purpose.

    CKPT_DIR/<CKPT_NAME>/lease.json     {"owner": token, "host", "container_id", "beat", ...}

- Acquire: O_CREAT|O_EXCL of lease.json (atomic on NFSv3+). Whoever creates it
  owns the lineage.
- Heartbeat: every `interval` the owner checks the file still names its token,
  then rewrites it (tmp -> rename) with `beat` + 1. If somebody else's token is
  there, the lease was taken over: the owner is fenced and must stop its app.
- Release: the owner unlinks it after publishing its final checkpoint (or when
  its app exits). A waiting replacement then acquires it and restores.
- Expiry: a lease whose content has not changed for `timeout` seconds, as timed
  by the *waiter's own* monotonic clock, belongs to a dead instance. Judging by
  observed change rather than by the writer's timestamps makes hosts' clock
  skew irrelevant. The taker renames the stale file away (only one rename of a
  given file can succeed) and then acquires with O_EXCL.

flock() would be a hint at best on NFS (local-only or a no-op on some mounts),
so it is not used.

lease.json is read from the shared volume, so it is untrusted: it is opened
without following a symlink and only if it is a regular file (a FIFO never
blocks), bounded in size, and parsed into a checked record. A lease that is
none of that (a symlink, a FIFO, malformed JSON, a field of the wrong type) is
"unreadable": nobody's lease, which beats no more, so it is taken over after
CKPT_LEASE_TIMEOUT of no change, exactly like a dead holder's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from supervisor_pkg.errors import LeaseHeld, LeaseLost, StoppedWhileWaiting, StoreError
from supervisor_pkg.store import describe_os_error
from supervisor_pkg.volume import Directory, VolumeRefusal, parse_json_object

LEASE_FILE = "lease.json"
_LEASE_LIMIT = 64 * 1024
# The fields a lease record may hold, and their types: anything else makes it unreadable.
_FIELDS: dict[str, tuple[type, ...]] = {
    "owner": (str,), "host": (str, type(None)), "container_id": (str, type(None)), "image_id": (str, type(None)),
    "pid": (int,), "beat": (int,), "time": (int, float), "interval": (int, float), "timeout": (int, float),
}
log = logging.getLogger("criu-supervisor")


def _checked(data: dict[str, Any]) -> dict[str, Any]:
    """The record if every known field has its type (unknown fields kept for comparison), else an unreadable one."""
    for key, kinds in _FIELDS.items():
        value = data.get(key)
        if key in data and (isinstance(value, bool) or not isinstance(value, kinds)):
            return {"unreadable": f"its field {key!r} has the wrong type"}
        if isinstance(value, float) and value != value:
            return {"unreadable": f"its field {key!r} is not a number"}
    if not isinstance(data.get("owner"), str):
        return {"unreadable": "it names no owner"}
    return data


class Lease:
    def __init__(self, lineage: str | Directory, identity: dict[str, Any], interval: float, timeout: float) -> None:
        self.lineage = lineage if isinstance(lineage, Directory) else Directory.open(lineage)
        self.path = os.path.join(lineage if isinstance(lineage, str) else lineage.path, LEASE_FILE)
        self.identity = identity
        self.interval = interval
        self.timeout = timeout
        self.token = secrets.token_hex(16)
        self.beat = 0
        self.held = False
        self.taken_over = False  # check() found another holder: the heartbeat must report it (fencing)
        self.taken_from: dict[str, Any] | None = None  # the dead holder's last record, when we took an expired lease
        self._lock = threading.Lock()

    # --- reading --------------------------------------------------------------
    def read(self) -> dict[str, Any] | None:
        """The lease record; None if there is none; {"unreadable": why} if it is no lease (see the module
        docstring). OSError (EIO, ESTALE...) propagates: it says nothing about who holds the lease, so
        callers retry rather than conclude."""
        try:
            data = self.lineage.read_bytes(LEASE_FILE, _LEASE_LIMIT)
        except FileNotFoundError:
            return None
        except VolumeRefusal as refusal:
            return {"unreadable": refusal.message}
        try:
            return _checked(parse_json_object(data, self.path))
        except VolumeRefusal as refusal:
            return {"unreadable": refusal.message}

    def _record(self) -> dict[str, Any]:
        return {
            "owner": self.token,
            **self.identity,
            "pid": os.getpid(),
            "beat": self.beat,
            "time": time.time(),
            "interval": self.interval,
            "timeout": self.timeout,
        }

    # --- acquiring --------------------------------------------------------------
    def try_create(self) -> bool:
        """O_EXCL: True if we created the lease. A write that fails (a full volume) leaves no empty lease."""
        try:
            created = self.lineage.create_exclusive(LEASE_FILE, json.dumps(self._record()).encode())
        except VolumeRefusal as refusal:  # a symlink or a directory there: never written through
            raise OSError(errno.EEXIST, refusal.message) from refusal
        if created:
            self.held = True
        return created

    def acquire(self, handoff_timeout: float, should_stop: Callable[[float], bool]) -> str:
        """Take the lease, waiting for a handoff or an expiry. Returns how it was taken.

        `should_stop(seconds)` sleeps up to `seconds` and returns True if the
        supervisor was asked to stop meanwhile (then LeaseHeld is raised).
        """
        deadline = time.monotonic() + handoff_timeout
        observed: str | None = None
        observed_since = time.monotonic()
        announced = False
        while True:
            try:
                if self.try_create():
                    return "released by its previous holder" if announced else "free"
            except OSError as error:
                if error.errno != errno.EEXIST:
                    raise StoreError(f"cannot create the lease: {describe_os_error(error, self.path)}") from error
            try:
                current = self.read()
            except OSError as error:
                current = {"unreadable": error.strerror}
            if current is None and not announced:
                continue  # released between our create and our read: try again at once, once
            current = current or {"unreadable": "vanished"}
            if self._is_previous_life_of_this_container(current) and self._take_over(
                json.dumps(current, sort_keys=True), current
            ):
                return "left by an earlier run of this same container"
            content = json.dumps(current, sort_keys=True)
            now = time.monotonic()
            if content != observed:
                observed, observed_since = content, now
            elif now - observed_since >= self.timeout:
                log.warning(
                    "lease of host %s container %s has not beaten for %.0f s (CKPT_LEASE_TIMEOUT); taking over",
                    current.get("host"), _short(current.get("container_id")), now - observed_since,
                )
                if self._take_over(content, current):
                    return "expired"
                observed = None  # somebody else took it first: watch the new holder
            if not announced:
                log.info(
                    "another instance holds the lease (host %s, container %s); waiting up to %.0f s "
                    "(CKPT_HANDOFF_TIMEOUT) for its final checkpoint", current.get("host"),
                    _short(current.get("container_id")), handoff_timeout,
                )
                announced = True
            if now >= deadline:
                raise LeaseHeld(
                    f"the lineage is still leased by host {current.get('host')} container "
                    f"{_short(current.get('container_id'))} after {handoff_timeout:.0f} s (CKPT_HANDOFF_TIMEOUT): "
                    "another instance is running this app; give each replica its own CKPT_NAME"
                )
            # A handoff ends when the holder deletes the lease: look often (a small read), so that the
            # replacement does not add up to a second to every migration.
            if should_stop(min(0.2, max(0.05, self.interval / 2))):
                raise StoppedWhileWaiting(
                    "stopped while waiting for the lease; nothing was running, nothing to checkpoint"
                )

    def _is_previous_life_of_this_container(self, current: dict[str, Any]) -> bool:
        mine = self.identity.get("container_id")
        return bool(mine) and current.get("container_id") == mine and current.get("host") == self.identity.get("host")

    def _take_over(self, stale_content: str, stale: dict[str, Any]) -> bool:
        """Replace the lease we watched go stale. False if another taker was faster.

        rename() moves whatever lease.json is there *now*. If that is no longer
        the stale record we watched (a faster taker already replaced it), we put
        it back with link(), which fails rather than overwrite, and keep waiting.
        """
        moved = f"{LEASE_FILE}.stale-{secrets.token_hex(4)}"
        try:
            self.lineage.rename(LEASE_FILE, self.lineage, moved)
        except FileNotFoundError:
            return False
        try:
            raw = self.lineage.read_bytes(moved, _LEASE_LIMIT)
            moved_content = json.dumps(_checked(parse_json_object(raw, moved)), sort_keys=True)
        except (OSError, VolumeRefusal):
            moved_content = stale_content if "unreadable" in stale else ""
        if moved_content != stale_content:
            with contextlib.suppress(OSError, VolumeRefusal):
                self.lineage.link(moved, self.lineage, LEASE_FILE)  # give the faster taker its lease back
            with contextlib.suppress(OSError, VolumeRefusal):
                self.lineage.unlink(moved)
            return False
        with contextlib.suppress(OSError, VolumeRefusal):
            self.lineage.remove_tree(moved)  # (a directory or a symlink put there goes too: never followed)
        if not self.try_create():
            return False
        self.taken_from = stale
        # A holder frozen in the middle of renew() may still land one late write
        # over ours. Wait one of its beats and make sure the lease stayed ours.
        interval = stale.get("interval")
        beat = float(interval) if isinstance(interval, (int, float)) and 0 < interval < 3600 else self.interval
        time.sleep(min(beat, self.timeout / 2))
        try:
            self.check()
        except LeaseLost:
            return False
        return True

    # --- holding ----------------------------------------------------------------
    def renew(self) -> None:
        """Beat once. Raises LeaseLost if somebody else now owns the lease."""
        with self._lock:
            if not self.held:
                if self.taken_over:  # seen by check() while publishing: the heartbeat reports it now
                    raise LeaseLost("the lease was taken over (seen while publishing a checkpoint)")
                return
            current = self.read()  # OSError propagates: the heartbeat logs it and retries
            if current is not None and "unreadable" in current:
                raise OSError(errno.EIO, f"lease file unreadable ({current['unreadable']})")
            if current is None or current.get("owner") != self.token:
                self.held = False
                holder = current or {}
                raise LeaseLost(
                    f"the lease was taken over by host {holder.get('host')} container "
                    f"{_short(holder.get('container_id'))}"
                )
            self.beat += 1
            try:
                self.lineage.write_atomically(LEASE_FILE, json.dumps(self._record()).encode())
            except VolumeRefusal as refusal:
                raise OSError(errno.EIO, refusal.message) from refusal

    def check(self) -> None:
        """Fencing before publishing: raise LeaseLost unless we still own it."""
        try:
            current = self.read()
        except OSError as error:
            raise LeaseLost(f"cannot read the lease ({error.strerror}); not publishing without proof of it") from error
        if not self.held or current is None or current.get("owner") != self.token:
            self.taken_over = self.taken_over or self.held  # held until now: somebody else took it
            self.held = False
            raise LeaseLost("the lease is no longer ours; not publishing a checkpoint over the new holder's")

    def release(self) -> None:
        with self._lock:
            if not self.held:
                return
            with contextlib.suppress(OSError, VolumeRefusal):
                current = self.read()
                if current is not None and current.get("owner") == self.token:
                    self.lineage.unlink(LEASE_FILE)
            self.held = False


class Heartbeat(threading.Thread):
    """Renews the lease every interval; reports loss through `on_lost`, once.

    `stuck()` (set by the supervisor) names why the holder is stuck, or returns
    None: a supervisor whose restore makes no progress must not keep its lease
    alive, or a healthy replacement would wait on it forever. While it is stuck
    the beats stop (the lease expires for others after CKPT_LEASE_TIMEOUT);
    the restore is killed by its own watchdog, and a restored tree is never
    resumed without the lease (fencing at pre-resume).
    """

    def __init__(self, lease: Lease, on_lost: Callable[[str], None]) -> None:
        super().__init__(name="lease-heartbeat", daemon=True)
        self.lease = lease
        self.on_lost = on_lost
        self.stuck: Callable[[], str | None] = lambda: None
        self._stop_event = threading.Event()
        self._failing = False
        self._holding_back = False

    def run(self) -> None:
        while not self._stop_event.wait(self.lease.interval):
            reason = self.stuck()
            if reason is not None:
                if not self._holding_back:
                    log.warning("not renewing the lease: %s", reason)
                    self._holding_back = True
                continue
            self._holding_back = False
            try:
                self.lease.renew()
                if self._failing:
                    log.info("lease heartbeat works again")
                    self._failing = False
            except LeaseLost as error:
                self.on_lost(error.message)
                return
            except OSError as error:
                if not self._failing:  # log once per state change, not once per beat
                    log.warning("cannot renew the lease (%s); retrying every %.0f s",
                                error.strerror, self.lease.interval)
                    self._failing = True

    def stop(self) -> None:
        self._stop_event.set()


def _short(container_id: object) -> str:
    return str(container_id)[:12] if container_id else "?"
