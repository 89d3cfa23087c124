"""GCP: Compute Engine preemption (Spot and preemptible VMs), via the metadata server.

Protocol (Compute Engine docs, "Detect if a VM was preempted", "Wait for
change"; the same parameters Google's guest agent uses in metadata_watcher.py):

- Every request carries `Metadata-Flavor: Google`, and every answer of the real
  server carries it back: an answer without it comes from something else (a
  proxy, another cloud's metadata service) and is refused here.
- `GET /computeMetadata/v1/instance/preempted` answers `FALSE` or `TRUE` at once,
  with an `ETag` header.
- With `?wait_for_change=true&last_etag=<etag>&timeout_sec=<n>` the server
  holds the request until the value's ETag differs from `last_etag` (at once if
  it already does, so no change between two requests is lost) or `n` seconds
  pass, then answers the current value.
- `TRUE` means the VM is being preempted: Spot and preemptible VMs get about
  30 s between the ACPI soft-off and the hard stop.

So the trigger reads the value once plainly (an instance preempted before we
started is caught at once), then holds one hanging GET open at a time. The
read timeout is the hang plus `timeout`, so a server that holds on past its own
`timeout_sec` is noticed rather than waited on forever.
"""

from __future__ import annotations

import math
import time

import requests

from supervisor_pkg.triggers import Notice, Post, Trigger
from supervisor_pkg.triggers.metadata_http import MetadataError, new_session, request, unexpected_status

# metadata.google.internal resolves to this; the address saves a DNS lookup
# that requests' timeouts would not bound.
DEFAULT_BASE_URL = "http://169.254.169.254"
PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
FLAVOR_HEADER = "Metadata-Flavor"
FLAVOR = "Google"
NOTICE_SECONDS = 30.0


class GcpTrigger(Trigger):
    """Posts a final Notice when `instance/preempted` turns TRUE."""

    source = "gcp"

    def __init__(
        self,
        post: Post,
        base_url: str = DEFAULT_BASE_URL,
        interval: float = 1.0,
        timeout: float = 2.0,
        session: requests.Session | None = None,
        hang_seconds: float = 60.0,
        notice_seconds: float = NOTICE_SECONDS,
        max_backoff: float = 60.0,
    ) -> None:
        # `interval` only paces a server that answers a hanging GET at once;
        # the hang itself paces the real one.
        super().__init__(post, interval, max_backoff)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session if session is not None else new_session()
        self.hang_seconds = max(1, math.ceil(hang_seconds))  # timeout_sec takes whole seconds
        self.notice_seconds = notice_seconds
        self._etag: str | None = None  # None until the first plain read succeeded
        self._final_posted = False

    def poll_once(self) -> Notice | None:
        if self._final_posted:
            return None
        url = self.base_url + PREEMPTED_PATH
        headers = {FLAVOR_HEADER: FLAVOR}
        if self._etag is None:
            what = "preempted"
            response = request(self.session, "GET", url, what=what, timeout=self.timeout, headers=headers)
        else:
            what = "preempted (waiting for change)"
            params = {"wait_for_change": "true", "timeout_sec": str(self.hang_seconds)}
            if self._etag:
                params["last_etag"] = self._etag
            response = request(
                self.session, "GET", url, what=what, headers=headers, params=params,
                timeout=(self.timeout, self.hang_seconds + self.timeout),
            )
        preempted = self._read_value(response, what)
        # A server without ETags still gets hanging GETs, only without last_etag.
        self._etag = response.headers.get("ETag", "")
        if not preempted:
            return None
        self._final_posted = True
        return Notice(
            source=self.source, final=True, deadline=time.time() + self.notice_seconds,
            detail=f"instance/preempted is TRUE: Compute Engine stops this VM in about {self.notice_seconds:g} s",
        )

    def _read_value(self, response: requests.Response, what: str) -> bool:
        if response.headers.get(FLAVOR_HEADER) != FLAVOR:
            raise MetadataError(
                f"{what}: {response.url} answered HTTP {response.status_code} without the "
                f"'{FLAVOR_HEADER}: {FLAVOR}' header, so it is not the Compute Engine metadata server; "
                "if this machine is not on GCP, turn the gcp trigger off"
            )
        if response.status_code != 200:
            raise unexpected_status(response, what)
        value = response.text.strip().upper()
        if value not in ("TRUE", "FALSE"):
            raise MetadataError(f"{what}: expected TRUE or FALSE, got {response.text.strip()[:80]!r}")
        return value == "TRUE"
