"""A local stand-in for the AWS, GCP and Azure metadata services, for container tests.

    python3 metadata_server.py CLOUD PORT [--lineage /checkpoints/default]

Runs inside the test container (docker exec -d), bound to 127.0.0.1, so the
supervisor under test polls it over the container's own loopback. It speaks
each documented protocol:
- aws:   IMDSv2. PUT /latest/api/token (X-aws-ec2-metadata-token-ttl-seconds)
         issues a token; GETs without a valid one get 401.
         /latest/meta-data/spot/instance-action: 404, then 200 {"action","time"}.
         /latest/meta-data/events/recommendations/rebalance: 404.
- gcp:   GET /computeMetadata/v1/instance/preempted[?wait_for_change=true] with
         Metadata-Flavor: Google -> "FALSE"/"TRUE"; wait_for_change hangs until
         the value changes (or 20 s).
- azure: GET /metadata/scheduledevents?api-version=... with Metadata: true ->
         {"DocumentIncarnation", "Events": [...]}; POST {"StartRequests": [...]}
         acknowledges an event.
The interruption is announced when the test creates /tmp/announce holding the
seconds from now to the deadline. Requests are logged as JSON lines in
/tmp/metadata.log; Azure acknowledgements record whether a generation was
already published on the volume when the ack arrived.
"""

from __future__ import annotations

import email.utils
import json
import os
import secrets
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ANNOUNCE = "/tmp/announce"
LOG = "/tmp/metadata.log"
CLOUD = sys.argv[1]
PORT = int(sys.argv[2])
LINEAGE = sys.argv[sys.argv.index("--lineage") + 1] if "--lineage" in sys.argv else "/checkpoints/default"
tokens: set[str] = set()
deadline: float | None = None
EVENT_ID = "A123BC45-1234-5678-AB90-ABCDEF123456"


def announced() -> float | None:
    """The deadline (epoch seconds), fixed when the announcement is first seen."""
    global deadline
    if deadline is None and os.path.exists(ANNOUNCE):
        with open(ANNOUNCE) as handle:
            deadline = time.time() + float(handle.read().strip() or "120")
    return deadline


def record(**fields: object) -> None:
    with open(LOG, "a") as handle:
        handle.write(json.dumps({"time": time.time(), **fields}) + "\n")


def published() -> list[str]:
    try:
        return sorted(n for n in os.listdir(LINEAGE)
                      if n.startswith("gen-") and os.path.exists(f"{LINEAGE}/{n}/manifest.json"))
    except OSError:
        return []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: object) -> None:
        pass

    def reply(self, code: int, body: str | bytes = b"", headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        path = urlsplit(self.path).path
        record(method="PUT", path=path)
        if CLOUD == "aws" and path == "/latest/api/token":
            if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return self.reply(400, "missing TTL")
            token = secrets.token_hex(16)
            tokens.add(token)
            return self.reply(200, token, {"X-aws-ec2-metadata-token-ttl-seconds":
                                           self.headers["X-aws-ec2-metadata-token-ttl-seconds"]})
        self.reply(404)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        record(method="GET", path=parts.path)
        if CLOUD == "aws":
            if self.headers.get("X-aws-ec2-metadata-token") not in tokens:
                return self.reply(401)
            if parts.path == "/latest/meta-data/spot/instance-action":
                when = announced()
                if when is None:
                    return self.reply(404, "Not Found")
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
                return self.reply(200, json.dumps({"action": "terminate", "time": stamp}),
                                  {"Content-Type": "text/plain"})
            return self.reply(404, "Not Found")
        if CLOUD == "gcp":
            if self.headers.get("Metadata-Flavor") != "Google":
                return self.reply(403, "Missing Metadata-Flavor:Google header.")
            if parts.path == "/computeMetadata/v1/instance/preempted":
                if "wait_for_change=true" in parts.query:
                    for _ in range(400):
                        if announced() is not None:
                            break
                        time.sleep(0.05)
                value = "TRUE" if announced() is not None else "FALSE"
                return self.reply(200, value, {"Metadata-Flavor": "Google", "Content-Type": "application/text"})
            return self.reply(404)
        if CLOUD == "azure":
            if self.headers.get("Metadata") != "true":
                return self.reply(400, json.dumps({"error": "Bad request. Required metadata header not specified"}))
            if parts.path == "/metadata/scheduledevents":
                when = announced()
                events = [] if when is None else [{
                    "EventId": EVENT_ID, "EventType": "Preempt", "ResourceType": "VirtualMachine",
                    "Resources": ["test-vm"], "EventStatus": "Scheduled",
                    "NotBefore": email.utils.formatdate(when, usegmt=True), "Description": "spot eviction",
                    "EventSource": "Platform", "DurationInSeconds": -1,
                }]
                return self.reply(200, json.dumps({"DocumentIncarnation": 1 if events else 0, "Events": events}),
                                  {"Content-Type": "application/json"})
            return self.reply(404)
        self.reply(404)

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
        if CLOUD == "azure" and parts.path == "/metadata/scheduledevents" and self.headers.get("Metadata") == "true":
            try:
                ids = [item["EventId"] for item in json.loads(body)["StartRequests"]]
            except (ValueError, KeyError, TypeError):
                return self.reply(400)
            record(method="POST", path=parts.path, acknowledged=ids, published=published())
            return self.reply(200)
        self.reply(404)


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
