"""The cloud triggers against real local HTTP servers that speak each documented protocol.

Each fake binds 127.0.0.1 on port 0 and runs in a thread: AWS IMDSv2 (token
PUT, 401 for a GET without a live token, token expiry), the GCE metadata server
(Metadata-Flavor both ways, hanging GETs with wait_for_change/last_etag/
timeout_sec) and Azure Scheduled Events (Metadata: true, StartRequests). The
triggers run in their own threads with short intervals, as the supervisor runs
them. Every thread and server is stopped in teardown, even when a test fails.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from supervisor_pkg.triggers import Notice, Trigger
from supervisor_pkg.triggers.aws import INSTANCE_ACTION_PATH, REBALANCE_PATH, TOKEN_PATH, AwsTrigger
from supervisor_pkg.triggers.azure import AzureTrigger
from supervisor_pkg.triggers.detect import cloud_hint, detect_cloud
from supervisor_pkg.triggers.gcp import PREEMPTED_PATH, GcpTrigger

LOGGER = "criu-supervisor"
FAST = {"interval": 0.05, "timeout": 0.5, "max_backoff": 0.1}


# --- a scriptable metadata server -------------------------------------------------------------


@dataclasses.dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: str
    at: float  # time.monotonic()


@dataclasses.dataclass
class Reply:
    status: int = 200
    body: str = ""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


HANG = object()  # a `respond` result: never answer (until teardown)
Respond = Callable[[Seen], Any]  # returns a Reply or HANG; may block to emulate a hanging GET


class FakeMetadataServer:
    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.seen: list[Seen] = []
        self.released = threading.Event()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                url = urlsplit(self.path)
                seen = Seen(
                    method=self.command, path=url.path, query=dict(parse_qsl(url.query)),
                    headers={name.lower(): value for name, value in self.headers.items()},
                    body=self.rfile.read(length).decode() if length else "", at=time.monotonic(),
                )
                with fake._lock:
                    fake.seen.append(seen)
                reply = fake.respond(seen)
                if reply is HANG:
                    fake.released.wait(30)
                    return
                data = reply.body.encode()
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = handle_one

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out and left: expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def requests_to(self, path: str, method: str = "GET") -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if seen.path == path and seen.method == method]

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


@pytest.fixture
def serve() -> Iterator[Callable[[Respond], FakeMetadataServer]]:
    servers: list[FakeMetadataServer] = []

    def start(respond: Respond) -> FakeMetadataServer:
        server = FakeMetadataServer(respond)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def closed_port_url() -> str:
    """A URL on which nothing listens: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Posted:
    """The `post` callable the supervisor would pass: collects notices."""

    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self._lock = threading.Lock()

    def __call__(self, notice: Notice) -> None:
        with self._lock:
            self.notices.append(notice)

    def __len__(self) -> int:
        with self._lock:
            return len(self.notices)


@pytest.fixture
def posted() -> Posted:
    return Posted()


@pytest.fixture
def start_trigger() -> Iterator[Callable[[Trigger], Trigger]]:
    started: list[Trigger] = []

    def start(trigger: Trigger) -> Trigger:
        started.append(trigger)
        trigger.start()
        return trigger

    yield start
    for trigger in started:
        trigger.stop()
    for trigger in started:
        trigger.join(10)
        assert not trigger.is_alive(), f"{trigger.name} did not stop"


@pytest.fixture
def log_records(caplog: pytest.LogCaptureFixture) -> Callable[[int], list[logging.LogRecord]]:
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    def at(level: int) -> list[logging.LogRecord]:
        return [record for record in caplog.records if record.name == LOGGER and record.levelno == level]

    return at


class CountingSession(requests.Session):
    """Counts attempts even when no server answers (connection refused)."""

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        self.attempts = 0

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.attempts += 1
        return super().request(*args, **kwargs)


# --- protocol fakes ---------------------------------------------------------------------------


class Imds:
    """AWS IMDSv2 with tokens required (HttpTokens=required)."""

    def __init__(self) -> None:
        self.tokens: dict[str, float] = {}  # token -> expiry, time.monotonic()
        self.instance_action: Reply | list[Reply] = Reply(404)
        self.rebalance: Reply = Reply(404)
        self.put_hangs = False
        self.unauthorized = 0
        # Seconds a token stays valid past its TTL, so that a test of renewal
        # "before expiry" does not hinge on scheduling jitter of a loaded machine.
        self.grace = 0.0

    def expire_tokens(self) -> None:
        self.tokens.clear()

    def __call__(self, seen: Seen) -> Any:
        now = time.monotonic()
        if seen.method == "PUT" and seen.path == TOKEN_PATH:
            if self.put_hangs:
                return HANG  # what a container sees when the hop limit drops the answer
            ttl = seen.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return Reply(400)
            token = uuid.uuid4().hex
            self.tokens[token] = now + int(ttl) + self.grace
            return Reply(200, token, {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
        if seen.method != "GET":
            return Reply(405)
        if self.tokens.get(seen.headers.get("x-aws-ec2-metadata-token", ""), 0.0) <= now:
            self.unauthorized += 1
            return Reply(401)
        if seen.path == INSTANCE_ACTION_PATH:
            if isinstance(self.instance_action, list):
                # Play a script of answers, one per request, then keep the last.
                return self.instance_action.pop(0) if len(self.instance_action) > 1 else self.instance_action[0]
            return self.instance_action
        if seen.path == REBALANCE_PATH:
            return self.rebalance
        return Reply(404)


class GceMetadata:
    """The GCE metadata server's instance/preempted, with wait_for_change."""

    def __init__(self, value: str = "FALSE", flavor: bool = True, status: int = 200) -> None:
        self.value, self.etag, self.flavor, self.status = value, 1, flavor, status
        self._changed = threading.Condition()
        self._closing = False

    def set(self, value: str) -> None:
        with self._changed:
            self.value, self.etag = value, self.etag + 1
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()

    def __call__(self, seen: Seen) -> Any:
        if seen.headers.get("metadata-flavor") != "Google":
            return Reply(403, "Missing Metadata-Flavor:Google header.", {"Metadata-Flavor": "Google"})
        if seen.path != PREEMPTED_PATH:
            return Reply(404, "", {"Metadata-Flavor": "Google"})
        if seen.query.get("wait_for_change") == "true":
            last = seen.query.get("last_etag", str(self.etag))
            with self._changed:
                self._changed.wait_for(lambda: str(self.etag) != last or self._closing,
                                       float(seen.query.get("timeout_sec", "60")))
        headers = {"ETag": str(self.etag), "Content-Type": "application/text"}
        if self.flavor:
            headers["Metadata-Flavor"] = "Google"
        return Reply(self.status, self.value, headers)


@pytest.fixture
def gce(
    serve: Callable[[Respond], FakeMetadataServer],
) -> Iterator[Callable[..., tuple[GceMetadata, FakeMetadataServer]]]:
    fakes: list[GceMetadata] = []

    def start(**kwargs: Any) -> tuple[GceMetadata, FakeMetadataServer]:
        fake = GceMetadata(**kwargs)
        fakes.append(fake)
        return fake, serve(fake)

    yield start
    for fake in fakes:
        fake.close()


class ScheduledEvents:
    """Azure IMDS: Scheduled Events and the compute name."""

    def __init__(self, events: list[dict[str, Any]] | None = None, vm_name: str | None = "vm-a") -> None:
        self.body = json.dumps({"DocumentIncarnation": 1, "Events": events or []})
        self.vm_name = vm_name
        self.approvals: list[tuple[float, Any]] = []  # (time.monotonic(), POST body)

    def set_events(self, events: list[dict[str, Any]]) -> None:
        self.body = json.dumps({"DocumentIncarnation": 2, "Events": events})

    def __call__(self, seen: Seen) -> Any:
        if seen.headers.get("metadata") != "true":
            return Reply(400, json.dumps({"error": "Bad request. Required metadata header not specified"}))
        if seen.path == "/metadata/instance/compute/name":
            return Reply(200, self.vm_name) if self.vm_name else Reply(404, "Not found")
        if seen.path != "/metadata/scheduledevents" or seen.query.get("api-version") != "2020-07-01":
            return Reply(400, json.dumps({"error": "Bad request"}))
        if seen.method == "POST":
            self.approvals.append((seen.at, json.loads(seen.body)))
            return Reply(200)
        return Reply(200, self.body, {"Content-Type": "application/json"})


def preempt(event_id: str = "602d9444-d2cd-49c7-8624-8643e7171297", resources: tuple[str, ...] = ("vm-a",),
            status: str = "Scheduled", not_before: str = "Mon, 19 Sep 2016 18:29:47 GMT",
            event_type: str = "Preempt") -> dict[str, Any]:
    return {
        "EventId": event_id, "EventType": event_type, "ResourceType": "VirtualMachine",
        "Resources": list(resources), "EventStatus": status, "NotBefore": not_before,
        "Description": "", "EventSource": "Platform", "DurationInSeconds": -1,
    }


def utc(year: int, month: int, day: int, hour: int, minute: int, second: int) -> float:
    return datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC).timestamp()


# --- AWS --------------------------------------------------------------------------------------


def test_aws_sends_a_fresh_token_with_every_get_and_parses_the_deadline(serve, posted, start_trigger, sleep_until):
    imds = Imds()
    server = serve(imds)
    # The fake enforces IMDSv2: no token, or one it never issued, is refused.
    assert requests.get(server.url + INSTANCE_ACTION_PATH, timeout=2).status_code == 401
    assert requests.get(server.url + INSTANCE_ACTION_PATH, headers={"X-aws-ec2-metadata-token": "forged"},
                        timeout=2).status_code == 401
    imds.unauthorized = 0
    probes = len(server.seen)

    trigger = start_trigger(AwsTrigger(posted, base_url=server.url, **FAST))
    sleep_until(lambda: len(server.requests_to(INSTANCE_ACTION_PATH)) >= 3, 5, what="three polls")
    assert len(posted) == 0, "404 means no notice"
    imds.instance_action = Reply(200, json.dumps({"action": "terminate", "time": "2017-09-18T08:22:00Z"}))
    sleep_until(lambda: len(posted) == 1, 5, what="the interruption notice")

    notice = posted.notices[0]
    assert (notice.source, notice.final, notice.early_warning) == ("aws", True, False)
    assert notice.deadline == utc(2017, 9, 18, 8, 22, 0)
    assert "terminate" in notice.detail
    puts = server.requests_to(TOKEN_PATH, "PUT")
    assert len(puts) == 1 and puts[0].headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert imds.unauthorized == 0
    issued = set(imds.tokens)
    assert all(seen.headers.get("x-aws-ec2-metadata-token") in issued for seen in server.seen[probes:]
               if seen.method == "GET")
    sleep_until(lambda: not trigger.is_alive(), 5, what="the trigger to stop after its final notice")


def test_aws_renews_the_token_after_a_401_without_logging_a_failure(serve, posted, start_trigger, sleep_until,
                                                                    log_records):
    imds = Imds()
    server = serve(imds)
    start_trigger(AwsTrigger(posted, base_url=server.url, **FAST))
    sleep_until(lambda: len(server.requests_to(INSTANCE_ACTION_PATH)) >= 2, 5, what="two polls")

    imds.expire_tokens()  # IMDS restarted, or the token outlived its TTL
    sleep_until(lambda: len(server.requests_to(TOKEN_PATH, "PUT")) == 2, 5, what="a second token")
    renewed_at = server.requests_to(TOKEN_PATH, "PUT")[1].at
    sleep_until(lambda: any(seen.at > renewed_at for seen in server.requests_to(REBALANCE_PATH)), 5,
                what="a poll with the new token")

    assert imds.unauthorized == 1, "one 401, then the trigger renews; it does not hammer with a dead token"
    assert log_records(logging.WARNING) == []
    imds.instance_action = Reply(200, json.dumps({"action": "stop", "time": "2030-01-01T00:00:00Z"}))
    sleep_until(lambda: len(posted) == 1, 5, what="the notice after renewal")


def test_aws_renews_the_token_before_it_expires(serve, posted, start_trigger, sleep_until):
    imds = Imds()
    imds.grace = 0.5  # a trigger that waited for the 401 would still get one, 1.5 s after each PUT
    server = serve(imds)
    start_trigger(AwsTrigger(posted, base_url=server.url, token_ttl=1, **FAST))
    sleep_until(lambda: len(server.requests_to(TOKEN_PATH, "PUT")) >= 3, 10, what="two renewals")
    assert imds.unauthorized == 0, "the token is renewed before the server expires it"
    ttls = [seen.headers["x-aws-ec2-metadata-token-ttl-seconds"] for seen in server.requests_to(TOKEN_PATH, "PUT")]
    assert ttls[:3] == ["1", "1", "1"]


def test_aws_rebalance_recommendation_is_one_early_warning_then_the_notice_stops_it(serve, posted, start_trigger,
                                                                                   sleep_until):
    imds = Imds()
    server = serve(imds)
    imds.rebalance = Reply(200, json.dumps({"noticeTime": "2020-10-27T08:22:00Z"}))
    trigger = start_trigger(AwsTrigger(posted, base_url=server.url, **FAST))
    sleep_until(lambda: len(posted) == 1, 5, what="the early warning")
    seen_before = len(server.requests_to(REBALANCE_PATH))
    sleep_until(lambda: len(server.requests_to(REBALANCE_PATH)) >= seen_before + 5, 5, what="five more polls")
    assert len(posted) == 1, "the recommendation stays up, but is posted once"
    warning = posted.notices[0]
    assert (warning.source, warning.final, warning.early_warning, warning.deadline) == ("aws", False, True, None)

    imds.rebalance = Reply(200, json.dumps({"noticeTime": "2020-10-27T09:00:00Z"}))
    sleep_until(lambda: len(posted) == 2, 5, what="the warning for a new recommendation")
    assert posted.notices[1].early_warning and not posted.notices[1].final

    imds.instance_action = Reply(200, json.dumps({"action": "hibernate", "time": "2020-10-27T09:02:00Z"}))
    sleep_until(lambda: len(posted) == 3, 5, what="the interruption notice")
    assert posted.notices[2].final and posted.notices[2].deadline == utc(2020, 10, 27, 9, 2, 0)
    sleep_until(lambda: not trigger.is_alive(), 5, what="the trigger to stop")
    assert trigger.poll_once() is None, "a final notice is posted only once"
    assert len(posted) == 3


def test_aws_token_put_timeout_explains_the_hop_limit_once(serve, posted, start_trigger, sleep_until, log_records):
    imds = Imds()
    imds.put_hangs = True
    server = serve(imds)
    trigger = start_trigger(AwsTrigger(posted, base_url=server.url, interval=0.05, timeout=0.2, max_backoff=0.1))
    sleep_until(lambda: len(server.requests_to(TOKEN_PATH, "PUT")) >= 3, 10, what="three token attempts")

    warnings = log_records(logging.WARNING)
    assert len(warnings) == 1, "logged once per change of state, not per attempt"
    message = warnings[0].getMessage()
    assert "HttpPutResponseHopLimit" in message and "--http-put-response-hop-limit 2" in message
    assert len(posted) == 0 and trigger.is_alive()


GARBAGE_INSTANCE_ACTIONS = {
    "not-json": Reply(200, "<html>captive portal</html>"),
    "json-list": Reply(200, '["terminate"]'),
    "missing-time": Reply(200, '{"action": "terminate"}'),
    "unknown-action": Reply(200, '{"action": "explode", "time": "2017-09-18T08:22:00Z"}'),
    "bad-time": Reply(200, '{"action": "terminate", "time": "in two minutes"}'),
    "server-error": Reply(500, "Internal Server Error"),
    "forbidden": Reply(403, "Forbidden"),
}


@pytest.mark.parametrize("reply", GARBAGE_INSTANCE_ACTIONS.values(), ids=GARBAGE_INSTANCE_ACTIONS.keys())
def test_aws_garbage_instance_action_posts_nothing(reply, serve, posted, start_trigger, sleep_until, log_records):
    imds = Imds()
    imds.instance_action = reply
    server = serve(imds)
    trigger = start_trigger(AwsTrigger(posted, base_url=server.url, **FAST))
    sleep_until(lambda: len(server.requests_to(INSTANCE_ACTION_PATH)) >= 3, 5, what="three polls")
    assert len(posted) == 0
    assert len(log_records(logging.WARNING)) == 1
    assert trigger.is_alive()


def test_aws_logs_failure_and_recovery_once_each(serve, posted, start_trigger, sleep_until, log_records):
    imds = Imds()
    imds.instance_action = [*GARBAGE_INSTANCE_ACTIONS.values(), Reply(404)]
    server = serve(imds)
    start_trigger(AwsTrigger(posted, base_url=server.url, **FAST))
    sleep_until(lambda: len(server.requests_to(REBALANCE_PATH)) >= 3, 10, what="polls after recovery")

    assert [record.getMessage() for record in log_records(logging.WARNING)] == [
        "aws trigger: MetadataError: spot instance-action: the answer is not JSON ('<html>captive portal</html>');"
        + " retrying with back-off, other triggers keep working"
    ]
    assert [record.getMessage() for record in log_records(logging.INFO)] == ["aws trigger works again"]
    assert len(posted) == 0


# --- GCP --------------------------------------------------------------------------------------


def test_gcp_hanging_get_returns_true_and_posts_the_notice(gce, posted, start_trigger, sleep_until):
    fake, server = gce()
    start_trigger(GcpTrigger(posted, base_url=server.url, hang_seconds=5, **FAST))

    def hanging() -> list[Seen]:
        return [seen for seen in server.requests_to(PREEMPTED_PATH) if seen.query.get("wait_for_change") == "true"]

    sleep_until(lambda: hanging(), 5, what="a hanging GET")
    first, waiting = server.requests_to(PREEMPTED_PATH)[0], hanging()[0]
    assert "wait_for_change" not in first.query, "the current value is read plainly first"
    assert waiting.query["last_etag"] == "1" and waiting.query["timeout_sec"] == "5"

    preempted_at = time.time()
    fake.set("TRUE")
    sleep_until(lambda: len(posted) == 1, 5, what="the preemption notice")
    notice = posted.notices[0]
    assert (notice.source, notice.final) == ("gcp", True)
    assert notice.deadline is not None and preempted_at + 29 <= notice.deadline <= time.time() + 30
    assert len(server.seen) == 2, "one plain read, one hanging GET: no busy polling"
    assert all(seen.headers.get("metadata-flavor") == "Google" for seen in server.seen)


def test_gcp_already_preempted_at_start(gce, posted, start_trigger, sleep_until):
    _, server = gce(value="TRUE")
    trigger = start_trigger(GcpTrigger(posted, base_url=server.url, hang_seconds=5, **FAST))
    sleep_until(lambda: len(posted) == 1, 5, what="the preemption notice")
    sleep_until(lambda: not trigger.is_alive(), 5, what="the trigger to stop")
    assert len(server.seen) == 1 and posted.notices[0].final


def test_gcp_keeps_waiting_when_the_server_hang_ends_without_a_change(gce, posted, start_trigger, sleep_until,
                                                                      log_records):
    fake, server = gce()
    start_trigger(GcpTrigger(posted, base_url=server.url, hang_seconds=1, **FAST))
    sleep_until(lambda: len(server.seen) >= 3, 10, what="two hanging GETs that timed out on the server")
    assert len(posted) == 0 and log_records(logging.WARNING) == []
    fake.set("TRUE")
    sleep_until(lambda: len(posted) == 1, 5, what="the preemption notice")


def test_gcp_rejects_an_answer_without_metadata_flavor(gce, posted, start_trigger, sleep_until, log_records):
    _, server = gce(value="TRUE", flavor=False)  # e.g. another cloud's metadata service, or a proxy
    trigger = start_trigger(GcpTrigger(posted, base_url=server.url, hang_seconds=1, **FAST))
    sleep_until(lambda: len(server.seen) >= 3, 5, what="three attempts")
    assert len(posted) == 0
    warnings = log_records(logging.WARNING)
    assert len(warnings) == 1 and "Metadata-Flavor: Google" in warnings[0].getMessage()
    assert trigger.is_alive()


@pytest.mark.parametrize(("value", "status"), [("maybe", 200), ("", 200), ("TRUE", 503)],
                         ids=["not-a-boolean", "empty", "unavailable"])
def test_gcp_garbage_posts_nothing(value, status, gce, posted, start_trigger, sleep_until, log_records):
    _, server = gce(value=value, status=status)
    trigger = start_trigger(GcpTrigger(posted, base_url=server.url, hang_seconds=1, **FAST))
    sleep_until(lambda: len(server.seen) >= 3, 5, what="three attempts")
    assert len(posted) == 0 and len(log_records(logging.WARNING)) == 1 and trigger.is_alive()


# --- Azure ------------------------------------------------------------------------------------


def test_azure_preempt_is_approved_only_from_on_published(serve, posted, start_trigger, sleep_until):
    events = ScheduledEvents([preempt()])
    server = serve(events)
    trigger = start_trigger(AzureTrigger(posted, base_url=server.url, **FAST))
    sleep_until(lambda: len(posted) == 1, 5, what="the preemption notice")
    notice = posted.notices[0]
    assert (notice.source, notice.final) == ("azure", True)
    assert notice.deadline == utc(2016, 9, 19, 18, 29, 47)
    assert "602d9444-d2cd-49c7-8624-8643e7171297" in notice.detail

    sleep_until(lambda: not trigger.is_alive(), 5, what="the trigger to stop after its final notice")
    assert events.approvals == [], "nothing is approved before the checkpoint is published"

    assert notice.on_published is not None
    published_at = time.monotonic()
    notice.on_published("gen-000001")
    assert [body for _, body in events.approvals] == [
        {"StartRequests": [{"EventId": "602d9444-d2cd-49c7-8624-8643e7171297"}]}
    ]
    assert events.approvals[0][0] >= published_at
    (post,) = server.requests_to("/metadata/scheduledevents", "POST")
    assert post.headers["metadata"] == "true" and post.query["api-version"] == "2020-07-01"


def test_azure_failed_checkpoint_approves_nothing(serve, posted, start_trigger, sleep_until, log_records):
    events = ScheduledEvents([preempt()])
    server = serve(events)
    start_trigger(AzureTrigger(posted, base_url=server.url, **FAST))
    sleep_until(lambda: len(posted) == 1, 5, what="the preemption notice")
    assert posted.notices[0].on_failed is not None
    posted.notices[0].on_failed("ENOSPC on the volume")
    assert events.approvals == []
    assert any("not approving" in record.getMessage() for record in log_records(logging.WARNING))


def test_azure_ignores_other_vms_and_other_event_types(serve, posted, start_trigger, sleep_until):
    events = ScheduledEvents([
        preempt(event_id="other-vm", resources=("vm-b",)),
        preempt(event_id="reboot", event_type="Reboot"),
        preempt(event_id="freeze", event_type="Freeze"),
    ])
    server = serve(events)
    start_trigger(AzureTrigger(posted, base_url=server.url, **FAST))
    sleep_until(lambda: len(server.requests_to("/metadata/scheduledevents")) >= 3, 5, what="three polls")
    assert len(posted) == 0
    assert len(server.requests_to("/metadata/instance/compute/name")) == 1, "the name is looked up once"

    events.set_events([
        preempt(event_id="other-vm", resources=("vm-b",)),
        preempt(event_id="ours", resources=("VM-A",)),  # Azure names are case-insensitive
    ])
    sleep_until(lambda: len(posted) == 1, 5, what="the notice for this VM")
    assert posted.notices[0].on_published is not None
    posted.notices[0].on_published("gen-000002")
    assert [body for _, body in events.approvals] == [{"StartRequests": [{"EventId": "ours"}]}]


def test_azure_unknown_vm_name_counts_every_preempt(serve, posted, start_trigger, sleep_until, log_records):
    events = ScheduledEvents([], vm_name=None)
    server = serve(events)
    start_trigger(AzureTrigger(posted, base_url=server.url, **FAST))
    sleep_until(lambda: len(server.requests_to("/metadata/scheduledevents")) >= 4, 5, what="four polls")
    assert len(server.requests_to("/metadata/instance/compute/name")) == 3, "three tries, then no more"
    assert any("name is unknown" in record.getMessage() for record in log_records(logging.INFO))

    events.set_events([preempt(resources=("some-other-name",), status="Started", not_before="")])
    sleep_until(lambda: len(posted) == 1, 5, what="the notice")
    deadline = posted.notices[0].deadline
    assert deadline is not None and abs(deadline - time.time()) < 5, "a started eviction is under way now"


GARBAGE_SCHEDULED_EVENTS = {
    "not-json": Reply(200, "Bad Gateway"),
    "json-list": Reply(200, "[]"),
    "events-not-a-list": Reply(200, '{"DocumentIncarnation": 1, "Events": {}}'),
    "event-not-an-object": Reply(200, '{"Events": ["Preempt"]}'),
    "preempt-without-id": Reply(200, json.dumps({"Events": [{"EventType": "Preempt", "Resources": ["vm-a"]}]})),
    "resources-not-a-list": Reply(200, json.dumps({"Events": [{**preempt(), "Resources": "vm-a"}]})),
    "unknown-status": Reply(200, json.dumps({"Events": [{**preempt(), "EventStatus": "Pending"}]})),
    "server-error": Reply(500, "oops"),
}


@pytest.mark.parametrize("reply", GARBAGE_SCHEDULED_EVENTS.values(), ids=GARBAGE_SCHEDULED_EVENTS.keys())
def test_azure_garbage_posts_nothing(reply, serve, posted, start_trigger, sleep_until, log_records):
    events = ScheduledEvents()

    def respond(seen: Seen) -> Any:
        if seen.path == "/metadata/scheduledevents" and seen.method == "GET":
            return reply
        return events(seen)

    server = serve(respond)
    trigger = start_trigger(AzureTrigger(posted, base_url=server.url, **FAST))
    sleep_until(lambda: len(server.requests_to("/metadata/scheduledevents")) >= 3, 5, what="three polls")
    assert len(posted) == 0 and len(log_records(logging.WARNING)) == 1 and trigger.is_alive()


# --- every trigger ----------------------------------------------------------------------------

FACTORIES: dict[str, Callable[..., Trigger]] = {
    "aws": lambda post, url, **kw: AwsTrigger(post, base_url=url, **kw),
    "gcp": lambda post, url, **kw: GcpTrigger(post, base_url=url, hang_seconds=1, **kw),
    "azure": lambda post, url, **kw: AzureTrigger(post, base_url=url, enable_timeout=0.2, **kw),
}


@pytest.mark.parametrize("cloud", FACTORIES)
def test_connection_refused_posts_nothing_and_logs_once(cloud, closed_port_url, posted, start_trigger, sleep_until,
                                                        log_records):
    session = CountingSession()
    trigger = start_trigger(FACTORIES[cloud](posted, closed_port_url, session=session, **FAST))
    sleep_until(lambda: session.attempts >= 4, 5, what="several attempts")
    warnings = log_records(logging.WARNING)
    assert len(warnings) == 1 and "Connection refused" in warnings[0].getMessage()
    assert len(posted) == 0 and trigger.is_alive()


@pytest.mark.parametrize("cloud", FACTORIES)
def test_server_hanging_past_the_timeout_posts_nothing_and_logs_once(cloud, serve, posted, start_trigger,
                                                                     sleep_until, log_records):
    server = serve(lambda seen: HANG)
    trigger = start_trigger(FACTORIES[cloud](posted, server.url, interval=0.05, timeout=0.2, max_backoff=0.1))
    sleep_until(lambda: len(server.seen) >= 3, 10, what="three attempts")
    warnings = log_records(logging.WARNING)
    assert len(warnings) == 1 and "no answer" in warnings[0].getMessage()
    assert len(posted) == 0 and trigger.is_alive()


# --- detect_cloud -----------------------------------------------------------------------------


def dmi(tmp_path: Path, **fields: str) -> tuple[str, ...]:
    directory = tmp_path / "dmi"
    directory.mkdir()
    for name, value in fields.items():
        (directory / name).write_text(value + "\n")
    return (str(directory),)


NO_XEN = "/nonexistent/hypervisor/uuid"


def test_detect_sends_nothing_without_a_hint(tmp_path, serve):
    server = serve(lambda seen: Reply(200, "hello", {"Metadata-Flavor": "Google"}))
    urls = {"aws": server.url, "gcp": server.url, "azure": server.url}
    laptop = dmi(tmp_path, sys_vendor="LENOVO", product_name="20XW0055GE", bios_vendor="LENOVO")
    assert detect_cloud(urls=urls, dmi_directories=laptop, hypervisor_uuid=NO_XEN) is None
    assert detect_cloud(urls=urls, dmi_directories=(str(tmp_path / "absent"),), hypervisor_uuid=NO_XEN) is None
    assert server.seen == [], "no hint, no traffic"


@pytest.mark.parametrize(("cloud", "fields"), [
    ("aws", {"sys_vendor": "Amazon EC2", "product_name": "m6i.large", "bios_vendor": "Amazon EC2"}),
    ("aws", {"sys_vendor": "Xen", "product_name": "HVM domU", "bios_version": "4.11.amazon"}),
    ("gcp", {"sys_vendor": "Google", "product_name": "Google Compute Engine"}),
    ("azure", {"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine",
               "chassis_asset_tag": "7783-7084-3265-9085-8269-3286-77"}),
], ids=["aws-nitro", "aws-xen", "gcp", "azure"])
def test_detect_confirms_a_hint_with_one_request(cloud, fields, tmp_path, serve, gce):
    if cloud == "gcp":
        _, server = gce()
    else:
        server = serve(Imds() if cloud == "aws" else ScheduledEvents())
    directories = dmi(tmp_path, **fields)
    assert cloud_hint(directories, NO_XEN) == cloud
    assert detect_cloud(urls={cloud: server.url}, dmi_directories=directories, hypervisor_uuid=NO_XEN) == cloud
    assert len(server.seen) == 1


def test_detect_reads_the_xen_hypervisor_uuid(tmp_path):
    uuid_file = tmp_path / "uuid"
    uuid_file.write_text("ec2e1916-9099-7caf-fd21-012345abcdef\n")
    assert cloud_hint((str(tmp_path / "absent"),), str(uuid_file)) == "aws"


@pytest.mark.parametrize("answer", ["refused", "hangs", "wrong-server"])
def test_detect_returns_none_quickly_when_the_hint_is_not_confirmed(answer, tmp_path, serve, closed_port_url):
    if answer == "refused":
        url = closed_port_url
    else:
        # A silent server, or one that is not the GCE metadata server (no Metadata-Flavor).
        url = serve(lambda seen: HANG if answer == "hangs" else Reply(200, "FALSE")).url
    directories = dmi(tmp_path, sys_vendor="Google", product_name="Google Compute Engine")
    started = time.monotonic()
    assert detect_cloud(urls={"gcp": url}, dmi_directories=directories, hypervisor_uuid=NO_XEN) is None
    assert time.monotonic() - started < 1.0, "start-up must not wait on detection"


def test_detect_does_not_take_local_hyper_v_for_azure(tmp_path, closed_port_url):
    directories = dmi(tmp_path, sys_vendor="Microsoft Corporation", product_name="Virtual Machine")
    assert cloud_hint(directories, NO_XEN) == "azure"
    assert detect_cloud(urls={"azure": closed_port_url}, dmi_directories=directories, hypervisor_uuid=NO_XEN) is None
