"""metrics: the app's listening ports from /proc/net/tcp{,6}, the port conflict check, and serve()."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from supervisor_pkg import metrics
from supervisor_pkg.errors import ConfigError

# Shaped like the kernel's (net/ipv4/tcp_ipv4.c, net/ipv6/tcp_ipv6.c): a header, then one line per socket.
PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 598 1 0000000046 100 0 0 10 0
   1: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 599 1 0000000047 100 0 0 10 0
   2: 0100007F:E3C6 0100007F:1F90 01 00000000:00000000 03:0000003E 00000000     0        0 0 3 000000007f
   3: 0100007F:1F91 00000000:0000 06 00000000:00000000 03:0000003E 00000000     0        0 0 3 000000007f
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when
   0: 00000000000000000000000000000000:2382 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000
   1: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000
"""


def test_listening_ports_are_those_in_state_0a_in_tcp_and_tcp6() -> None:
    # 0x1F90 = 8080 (0.0.0.0), 0x18EB = 6379 (127.0.0.1), 0x2382 = 9090 (::), 0x0050 = 80 (::1);
    # 8080 as a remote port (ESTABLISHED) and 8081 in TIME_WAIT (06) are not listening.
    assert metrics.listening_ports([PROC_NET_TCP, PROC_NET_TCP6]) == {8080, 6379, 9090, 80}


@pytest.mark.parametrize("text", ["", "garbage\n", "   0: 00000000:XYZW 00000000:0000 0A x\n",
                                  "   0: 00000000:+1F9 00000000:0000 0A x\n", "   0: 0000:1F90 00000000:0000 0A x\n",
                                  "   0: 00000000:0000 00000000:0000 0A x\n", "\x00\n" * 3])
def test_malformed_lines_are_skipped_not_fatal(text: str) -> None:
    assert metrics.listening_ports([text]) == set()


def test_read_listening_ports_sees_a_port_listened_on_now() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        assert listener.getsockname()[1] in metrics.read_listening_ports()


def test_read_listening_ports_of_a_missing_namespace_is_empty() -> None:
    assert metrics.read_listening_ports("/nonexistent/net") == set()


def test_the_apps_own_port_is_a_conflict_named_in_one_line() -> None:
    assert metrics.metrics_port_conflict(8080, {8080, 6379}) == (
        "CKPT_METRICS_PORT=8080 is the app's own port (it listened on it in the last checkpoint / it listens on it "
        "now): choose another port"
    )


@pytest.mark.parametrize(("port", "app_ports"), [(9090, {8080}), (9090, set()), (0, {0, 8080})])
def test_another_port_or_metrics_off_is_no_conflict(port: int, app_ports: set[int]) -> None:
    assert metrics.metrics_port_conflict(port, app_ports) is None


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a local test server
        return str(response.read().decode())


def test_serve_binds_the_given_address_without_a_reverse_dns_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*_args: object) -> str:
        raise AssertionError("getfqdn called: a reverse DNS lookup at start")

    monkeypatch.setattr(socket, "getfqdn", no_dns)
    server = metrics.serve(metrics.Metrics(), 0, "127.0.0.1")
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        assert "criu_supervisor_up_state" in _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
        server.server_close()


def test_serve_binds_an_ipv6_address() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        server = metrics.serve(metrics.Metrics(), 0, "::1")
    except ConfigError as error:
        pytest.skip(f"no IPv6 loopback here: {error.message}")
    try:
        assert "criu_supervisor_up_state" in _get(f"http://[::1]:{server.server_address[1]}/metrics")
    finally:
        server.shutdown()
        server.server_close()


def test_a_port_in_use_is_refused_in_one_line_naming_it() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            metrics.serve(metrics.Metrics(), port, "127.0.0.1")
    message = caught.value.message
    assert message.startswith(f"CKPT_METRICS_PORT={port}: cannot serve metrics on 127.0.0.1:{port}")
    assert "another process listens on it" in message and "\n" not in message
    assert isinstance(caught.value.__cause__, OSError)


def test_an_address_not_of_this_host_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="not an address of this container"):
        metrics.serve(metrics.Metrics(), 0, "192.0.2.1")  # TEST-NET-1 (RFC 5737): never assigned
