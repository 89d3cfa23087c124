"""Azure: Spot VM eviction (`Preempt`) from Scheduled Events, via the Instance Metadata Service.

Protocol (Azure docs, "Azure Metadata Service: Scheduled Events for Linux VMs"):

- `GET /metadata/scheduledevents?api-version=2020-07-01` with `Metadata: true`
  (without it IMDS answers 400) returns
  `{"DocumentIncarnation": n, "Events": [{"EventId", "EventType",
  "ResourceType", "Resources": [names], "EventStatus": "Scheduled"|"Started",
  "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT", ...}]}`; `NotBefore` is blank
  once the event has started. `Preempt` (Spot eviction) has 30 s minimum notice.
- The first request enables the service for the VM and may take up to two
  minutes to answer, hence `enable_timeout` for reading until one succeeds.
- Events go to every VM of an availability set or scale-set placement group,
  so `Resources` says which VMs an event is for. This VM's name comes from
  `/metadata/instance/compute/name?api-version=2021-02-01&format=text`; while it
  is unknown, every Preempt event counts (a needless checkpoint beats a lost app).
- `POST` the same URL with `{"StartRequests": [{"EventId": id}]}` approves an
  event: Azure may then go ahead at once, for every VM in `Resources`. So the
  approval is sent only from the Notice's `on_published`, after the checkpoint
  is safely on the volume, never before; a failed checkpoint approves nothing
  and Azure proceeds at NotBefore.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import requests

from supervisor_pkg.triggers import Notice, Post, Trigger
from supervisor_pkg.triggers.metadata_http import (
    MetadataError,
    json_body,
    new_session,
    request,
    unexpected_status,
)

log = logging.getLogger("criu-supervisor")

DEFAULT_BASE_URL = "http://169.254.169.254"
EVENTS_PATH = "/metadata/scheduledevents"
EVENTS_API_VERSION = "2020-07-01"
NAME_PATH = "/metadata/instance/compute/name"
NAME_API_VERSION = "2021-02-01"
METADATA_HEADERS = {"Metadata": "true"}
NOTICE_SECONDS = 30.0
STATUSES = ("Scheduled", "Started")
_NAME_LOOKUPS = 3  # polls that try to learn the VM's name before giving up on filtering


class AzureTrigger(Trigger):
    """Posts a final Notice for a Preempt event; approves it once the checkpoint is published."""

    source = "azure"

    def __init__(
        self,
        post: Post,
        base_url: str = DEFAULT_BASE_URL,
        interval: float = 1.0,
        timeout: float = 2.0,
        session: requests.Session | None = None,
        vm_name: str | None = None,
        look_up_vm_name: bool = True,
        event_types: Sequence[str] = ("Preempt",),
        enable_timeout: float = 120.0,
        notice_seconds: float = NOTICE_SECONDS,
        max_backoff: float = 60.0,
    ) -> None:
        # 1 s, not 5: Preempt gives only 30 s, and IMDS allows 5 requests a second.
        super().__init__(post, interval, max_backoff)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session if session is not None else new_session()
        self.vm_name = vm_name
        self.event_types = tuple(event_types)
        self.enable_timeout = enable_timeout
        self.notice_seconds = notice_seconds
        self._name_lookups_left = _NAME_LOOKUPS if look_up_vm_name and vm_name is None else 0
        self._enabled = False  # True once Scheduled Events answered: later answers are prompt
        self._final_posted = False
        # The approval runs in the supervise loop's thread; requests.Session is not thread-safe.
        self._session_lock = threading.Lock()

    @property
    def events_url(self) -> str:
        return self.base_url + EVENTS_PATH

    def poll_once(self) -> Notice | None:
        if self._final_posted:
            return None
        if self.vm_name is None and self._name_lookups_left > 0:
            self._look_up_vm_name()
        what = "scheduled events"
        read_timeout = self.timeout if self._enabled else max(self.timeout, self.enable_timeout)
        with self._session_lock:
            response = request(
                self.session, "GET", self.events_url, what=what, headers=METADATA_HEADERS,
                params={"api-version": EVENTS_API_VERSION}, timeout=(self.timeout, read_timeout),
            )
        if response.status_code != 200:
            raise unexpected_status(response, what)
        self._enabled = True
        events = self._events_for_this_vm(json_body(response, what))
        if not events:
            return None
        event_ids = [event_id for event_id, _, _ in events]
        deadline = min(deadline for _, deadline, _ in events)
        self._final_posted = True
        return Notice(
            source=self.source, final=True, deadline=deadline,
            detail="; ".join(summary for _, _, summary in events),
            on_published=lambda generation: self._approve(event_ids, generation),
            on_failed=lambda reason: self._not_approved(event_ids, reason),
        )

    def _events_for_this_vm(self, body: Any) -> list[tuple[str, float, str]]:
        """(EventId, deadline, one-line summary) of each event to act on; raise on a malformed one."""
        what = "scheduled events"
        events = body.get("Events") if isinstance(body, dict) else None
        if not isinstance(events, list):
            raise MetadataError(f"{what}: expected a JSON object with an 'Events' list, got {body!r:.80}")
        found = []
        for event in events:
            if not isinstance(event, dict):
                raise MetadataError(f"{what}: an event is not a JSON object ({event!r:.80})")
            event_type = event.get("EventType")
            if event_type not in self.event_types:
                continue
            event_id, resources = event.get("EventId"), event.get("Resources")
            status, not_before = event.get("EventStatus"), event.get("NotBefore", "")
            if not isinstance(event_id, str) or not event_id:
                raise MetadataError(f"{what}: a {event_type} event has no EventId ({event!r:.120})")
            if not isinstance(resources, list) or not all(isinstance(name, str) for name in resources):
                raise MetadataError(f"{what}: event {event_id} has no list of Resources ({resources!r:.80})")
            if status not in STATUSES:
                raise MetadataError(f"{what}: event {event_id} has EventStatus {status!r}, not one of {STATUSES}")
            if not isinstance(not_before, str):
                raise MetadataError(f"{what}: event {event_id} has a NotBefore that is not a string ({not_before!r})")
            if self.vm_name is not None and self.vm_name.casefold() not in (name.casefold() for name in resources):
                continue  # for another VM of the availability set or scale set
            deadline = self._deadline(status, not_before)
            summary = f"scheduled event {event_type} {event_id} ({status}) for {', '.join(resources) or 'this VM'}"
            summary += f", not before {not_before}" if not_before else ""
            found.append((event_id, deadline, summary))
        return found

    def _deadline(self, status: str, not_before: str) -> float:
        now = time.time()
        if not_before:
            try:
                return email.utils.parsedate_to_datetime(not_before).timestamp()
            except (TypeError, ValueError):
                pass  # the event is real; only its time is unreadable: assume the minimum notice
        # A started event has a blank NotBefore: the eviction is under way.
        return now if status == "Started" else now + self.notice_seconds

    def _look_up_vm_name(self) -> None:
        """Learn this VM's name to match against Resources; failures only mean "accept every event"."""
        self._name_lookups_left -= 1
        try:
            with self._session_lock:
                response = request(
                    self.session, "GET", self.base_url + NAME_PATH, what="VM name", headers=METADATA_HEADERS,
                    params={"api-version": NAME_API_VERSION, "format": "text"}, timeout=self.timeout,
                )
        except MetadataError as error:
            log.debug("azure trigger: %s", error)
            return
        name = response.text.strip()
        if response.status_code == 200 and name:
            self.vm_name = name
        elif self._name_lookups_left == 0:
            log.info("azure trigger: this VM's name is unknown (HTTP %s), so every %s event counts as ours",
                     response.status_code, "/".join(self.event_types))

    def _approve(self, event_ids: list[str], generation: str) -> None:
        """on_published: tell Azure it may go ahead now; runs in the supervise loop's thread."""
        names = ", ".join(event_ids)
        try:
            with self._session_lock:
                response = request(
                    self.session, "POST", self.events_url, what="approving scheduled events",
                    headers=METADATA_HEADERS, params={"api-version": EVENTS_API_VERSION}, timeout=self.timeout,
                    json_body={"StartRequests": [{"EventId": event_id} for event_id in event_ids]},
                )
        except MetadataError as error:
            log.warning("azure trigger: %s; Azure still proceeds at NotBefore, nothing to do", error)
            return
        if response.status_code != 200:
            log.warning("azure trigger: approving event %s answered HTTP %s; Azure still proceeds at NotBefore, "
                        "nothing to do", names, response.status_code)
            return
        log.info("azure trigger: approved event %s after checkpoint %s was published", names, generation)

    def _not_approved(self, event_ids: list[str], reason: str) -> None:
        log.warning("azure trigger: not approving event %s because the checkpoint failed (%s); "
                    "Azure proceeds at NotBefore", ", ".join(event_ids), reason)
