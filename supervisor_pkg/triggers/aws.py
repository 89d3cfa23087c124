"""AWS: EC2 Spot interruption notices and rebalance recommendations, via IMDSv2.

Protocol (EC2 User Guide, "Spot Instance interruption notices", "EC2 instance
rebalance recommendations", "Use IMDSv2"):

- `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: 1..21600`
  returns a session token; every GET carries it as `X-aws-ec2-metadata-token`.
  An expired or unknown token gets HTTP 401.
- `GET /latest/meta-data/spot/instance-action`: 404 while nothing is planned;
  200 with `{"action": "terminate"|"stop"|"hibernate", "time": "...Z"}` about
  two minutes before the action (hibernation starts at once). AWS recommends
  checking every 5 seconds.
- `GET /latest/meta-data/events/recommendations/rebalance`: 404, or 200 with
  `{"noticeTime": "...Z"}` when the instance is at elevated risk of
  interruption. It can come well before the notice, or together with it.

The token PUT is where containers trip: the instance's
`HttpPutResponseHopLimit` (1 on older AMIs) is the IP TTL of the PUT's answer,
and a container behind a bridge is one hop further away, so the answer is
dropped and the PUT times out. `HOP_LIMIT_HINT` says how to fix it.
"""

from __future__ import annotations

import time
from typing import Any

import requests

from supervisor_pkg.triggers import Notice, Post, Trigger
from supervisor_pkg.triggers.metadata_http import (
    MetadataError,
    MetadataTimeout,
    json_body,
    new_session,
    parse_rfc3339,
    request,
    unexpected_status,
)

DEFAULT_BASE_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL = 21600  # seconds; the most IMDSv2 grants
ACTIONS = ("terminate", "stop", "hibernate")
# Renew when this fraction of the token's life has passed, so a GET never
# races the expiry; a 401 still forces a renewal (e.g. IMDS restarted).
_RENEW_AFTER = 0.9

HOP_LIMIT_HINT = (
    "IMDSv2 answers the token PUT with an IP TTL of the instance's HttpPutResponseHopLimit, and a "
    "container on bridge networking is one hop further away, so it needs a hop limit of at least 2: "
    "run 'aws ec2 modify-instance-metadata-options --instance-id <id> --http-put-response-hop-limit 2 "
    "--http-endpoint enabled' (or set MetadataOptions.HttpPutResponseHopLimit=2 in the launch template), "
    "or run the container with host networking"
)


class AwsTrigger(Trigger):
    """Posts a final Notice on a Spot interruption notice, an early warning on a rebalance recommendation."""

    source = "aws"

    def __init__(
        self,
        post: Post,
        base_url: str = DEFAULT_BASE_URL,
        interval: float = 5.0,
        timeout: float = 2.0,
        session: requests.Session | None = None,
        token_ttl: int = MAX_TOKEN_TTL,
        max_backoff: float = 60.0,
    ) -> None:
        if not 1 <= token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token_ttl={token_ttl} is not valid: IMDSv2 accepts 1 to {MAX_TOKEN_TTL} seconds")
        super().__init__(post, interval, max_backoff)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session if session is not None else new_session()
        self.token_ttl = token_ttl
        self._token: str | None = None
        self._renew_token_at = 0.0  # time.monotonic() scale
        self._rebalance_notice_time: str | None = None
        self._final_posted = False

    def poll_once(self) -> Notice | None:
        if self._final_posted:
            return None
        # The interruption notice first: when both are up, the rebalance
        # recommendation has nothing left to add.
        action = self._get_json(INSTANCE_ACTION_PATH, "spot instance-action")
        if action is not None:
            notice = self._interruption_notice(action)
            self._final_posted = True
            return notice
        rebalance = self._get_json(REBALANCE_PATH, "rebalance recommendation")
        if rebalance is not None:
            return self._rebalance_notice(rebalance)
        return None

    def _interruption_notice(self, body: Any) -> Notice:
        what = "spot instance-action"
        if not isinstance(body, dict):
            raise MetadataError(f"{what}: expected a JSON object with 'action' and 'time', got {type(body).__name__}")
        action, when = body.get("action"), body.get("time")
        if action not in ACTIONS:
            raise MetadataError(f"{what}: action {action!r} is not one of {', '.join(ACTIONS)}")
        if not isinstance(when, str):
            raise MetadataError(f"{what}: 'time' is missing or not a string ({when!r})")
        deadline = parse_rfc3339(when, what)
        return Notice(
            source=self.source, final=True, deadline=deadline, detail=f"spot instance-action {action} at {when}",
        )

    def _rebalance_notice(self, body: Any) -> Notice | None:
        what = "rebalance recommendation"
        notice_time = body.get("noticeTime") if isinstance(body, dict) else None
        if not isinstance(notice_time, str):
            raise MetadataError(f"{what}: expected a JSON object with a 'noticeTime' string, got {body!r:.80}")
        parse_rfc3339(notice_time, what)
        # The item stays up once issued: one early warning per recommendation.
        if notice_time == self._rebalance_notice_time:
            return None
        self._rebalance_notice_time = notice_time
        return Notice(
            source=self.source, final=False, early_warning=True,
            detail=f"rebalance recommendation issued {notice_time}: elevated risk of spot interruption",
        )

    def _get_json(self, path: str, what: str) -> Any:
        """GET an item with a valid token: its JSON on 200, None on 404."""
        response = self._get(path, what)
        if response.status_code == 401:
            # Expired early or revoked (IMDS restarted, clock jump): renew once.
            self._token = None
            response = self._get(path, what)
            if response.status_code == 401:
                raise MetadataError(f"{what}: IMDS refused a token it had just issued (HTTP 401)")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise unexpected_status(response, what)
        return json_body(response, what)

    def _get(self, path: str, what: str) -> requests.Response:
        return request(
            self.session, "GET", self.base_url + path, what=what, timeout=self.timeout,
            headers={TOKEN_HEADER: self._valid_token()},
        )

    def _valid_token(self) -> str:
        if self._token is None or time.monotonic() >= self._renew_token_at:
            self._token = self._new_token()
        return self._token

    def _new_token(self) -> str:
        what = "IMDSv2 token"
        url = self.base_url + TOKEN_PATH
        # Count the token's life from before the request: the server's clock starts later.
        requested_at = time.monotonic()
        try:
            response = request(
                self.session, "PUT", url, what=what, timeout=self.timeout,
                headers={TOKEN_TTL_HEADER: str(self.token_ttl)},
            )
        except MetadataTimeout as error:
            raise MetadataTimeout(f"{error}. {HOP_LIMIT_HINT}") from error
        if response.status_code != 200:
            raise unexpected_status(response, what)
        token = response.text.strip()
        if not token:
            raise MetadataError(f"{what}: PUT {url} answered 200 with an empty token")
        self._renew_token_at = requested_at + self.token_ttl * _RENEW_AFTER
        return token
