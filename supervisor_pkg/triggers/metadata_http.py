"""The small HTTP client the cloud triggers share to talk to metadata services.

It exists so that every way a metadata request can fail becomes one readable
`MetadataError` line, which the `Trigger` base class logs once per change of
state. The services themselves differ too much to share more than this.

Metadata services are link-local (169.254.169.254) and must be reached
directly: sessions made here ignore HTTP(S)_PROXY, NO_PROXY and .netrc
(`trust_env = False`), as Google's own guest agent does with an empty
ProxyHandler. A proxy in the environment for the app must not swallow or
redirect a preemption notice.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping
from typing import Any

import requests

# Stands for (connect timeout, read timeout) or one number for both, as in requests.
Timeout = float | tuple[float, float]

_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\][^'\")]*")


class MetadataError(Exception):
    """A metadata service could not be reached or answered something unusable."""


class MetadataTimeout(MetadataError):
    """A metadata request got no (complete) answer in time."""


def new_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # never through a proxy: see the module docstring
    return session


def request(
    session: requests.Session,
    method: str,
    url: str,
    *,
    what: str,
    timeout: Timeout,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    json_body: Any = None,
) -> requests.Response:
    """Send one request; turn every transport failure into a MetadataError naming `what`."""
    try:
        return session.request(
            method, url, headers=dict(headers or {}), params=dict(params or {}), json=json_body,
            timeout=timeout, allow_redirects=False,
        )
    except requests.Timeout as error:
        raise MetadataTimeout(f"{what}: no answer from {url} within {_seconds(timeout)}") from error
    except requests.ConnectionError as error:
        raise MetadataError(f"{what}: cannot connect to {url} ({_reason(error)})") from error
    except requests.RequestException as error:
        raise MetadataError(f"{what}: request to {url} failed ({_reason(error)})") from error


def unexpected_status(response: requests.Response, what: str) -> MetadataError:
    return MetadataError(
        f"{what}: unexpected HTTP {response.status_code} from {response.url} ({_excerpt(response.text)})"
    )


def json_body(response: requests.Response, what: str) -> Any:
    try:
        return json.loads(response.text)
    except ValueError as error:
        raise MetadataError(f"{what}: the answer is not JSON ({_excerpt(response.text)})") from error


def parse_rfc3339(text: str, what: str) -> float:
    """'2017-09-18T08:22:00Z' -> seconds since the epoch; a time without a zone is UTC."""
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError as error:
        raise MetadataError(f"{what}: {text!r} is not an RFC 3339 time") from error
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _seconds(timeout: Timeout) -> str:
    if isinstance(timeout, tuple):
        return f"{timeout[0]:g} s to connect and {timeout[1]:g} s to answer"
    return f"{timeout:g} s"


def _reason(error: requests.RequestException) -> str:
    # requests wraps urllib3 wraps the socket error; the "[Errno 111] Connection
    # refused" at the bottom is the part a person can act on.
    text = str(error)
    found = _ERRNO_TEXT.search(text)
    return found.group(0).strip() if found else text


def _excerpt(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    if not text:
        return "empty body"
    return repr(text if len(text) <= limit else text[:limit] + "...")
