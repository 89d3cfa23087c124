"""config.load: defaults, environment parsing, flag precedence, strict rejection."""

from __future__ import annotations

import dataclasses
import math
import re
import signal
from pathlib import Path

import pytest

from supervisor_pkg import config
from supervisor_pkg.config import SETTINGS, Config, load
from supervisor_pkg.errors import ConfigError

EXPECTED_DEFAULTS = {
    "dir": "/checkpoints",
    "name": "default",
    "restore": "auto",
    "signal": signal.SIGTERM,
    "tcp": "close",
    "log_level": "info",
    "keep": 2,
    "criu_log_level": "4",
    "lease_interval": 5.0,
    "lease_timeout": 30.0,
    "handoff_timeout": 300.0,
    "signing_key_file": None,
    "state_paths": (),
}


# --- defaults and the table ---------------------------------------------------------
def test_every_setting_has_its_documented_default_when_the_environment_is_empty() -> None:
    loaded = dataclasses.asdict(load({}))
    assert {field: loaded[field] for field in EXPECTED_DEFAULTS} == EXPECTED_DEFAULTS


@pytest.mark.parametrize("field", EXPECTED_DEFAULTS)
def test_the_table_default_of_each_setting_is_the_documented_one(field: str) -> None:
    setting = next(s for s in SETTINGS if s.field == field)
    assert setting.parse(setting.variable, setting.default) == EXPECTED_DEFAULTS[field]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.variable)
def test_an_empty_variable_means_the_default(setting: config.Setting) -> None:
    assert getattr(load({setting.variable: ""}), setting.field) == getattr(load({}), setting.field)


def test_every_config_field_has_exactly_one_setting_with_a_flag_twin() -> None:
    assert [s.field for s in SETTINGS] == [f.name for f in dataclasses.fields(Config)]
    for setting in SETTINGS:
        assert setting.flag == "--" + setting.variable.removeprefix("CKPT_").lower().replace("_", "-")
    assert {s.variable: s.flag for s in SETTINGS if s.field in EXPECTED_DEFAULTS} == {
        "CKPT_DIR": "--dir",
        "CKPT_NAME": "--name",
        "CKPT_RESTORE": "--restore",
        "CKPT_SIGNAL": "--signal",
        "CKPT_TCP": "--tcp",
        "CKPT_LOG_LEVEL": "--log-level",
        "CKPT_KEEP": "--keep",
        "CKPT_CRIU_LOG_LEVEL": "--criu-log-level",
        "CKPT_LEASE_INTERVAL": "--lease-interval",
        "CKPT_LEASE_TIMEOUT": "--lease-timeout",
        "CKPT_HANDOFF_TIMEOUT": "--handoff-timeout",
        "CKPT_SIGNING_KEY_FILE": "--signing-key-file",
        "CKPT_STATE_PATHS": "--state-paths",
    }


def test_the_settings_table_shows_every_variable_flag_and_default() -> None:
    table = config.describe_table()
    for setting in SETTINGS:
        assert f"| `{setting.variable}` | `{setting.flag}` | `{setting.default}` |" in table


# --- parsing the environment ----------------------------------------------------------
def test_every_variable_is_read_from_the_environment() -> None:
    loaded = load({
        "CKPT_DIR": "/mnt/shared",
        "CKPT_NAME": "kv-store.v2_blue-1",
        "CKPT_RESTORE": "require",
        "CKPT_SIGNAL": "SIGUSR1",
        "CKPT_TCP": "established",
        "CKPT_LOG_LEVEL": "debug",
        "CKPT_KEEP": "5",
        "CKPT_CRIU_LOG_LEVEL": "2",
        "CKPT_LEASE_INTERVAL": "0.5",
        "CKPT_LEASE_TIMEOUT": "2.5",
        "CKPT_HANDOFF_TIMEOUT": "0",
        "CKPT_SIGNING_KEY_FILE": "/run/secrets/ckpt-key",
        "CKPT_STATE_PATHS": "/var/lib/app:/tmp/cache/",
    })
    assert loaded == dataclasses.replace(
        load({}), dir="/mnt/shared", name="kv-store.v2_blue-1", restore="require", signal=signal.SIGUSR1,
        tcp="established", log_level="debug", keep=5, criu_log_level="2", lease_interval=0.5, lease_timeout=2.5,
        handoff_timeout=0.0, signing_key_file="/run/secrets/ckpt-key", state_paths=("/var/lib/app", "/tmp/cache"),
    )
    assert loaded.lineage_dir == "/mnt/shared/kv-store.v2_blue-1"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("SIGTERM", signal.SIGTERM), ("term", signal.SIGTERM), (" sigusr2 ", signal.SIGUSR2), ("PWR", signal.SIGPWR)],
)
def test_the_checkpoint_signal_accepts_names_with_or_without_sig_in_any_case(
    raw: str, expected: signal.Signals
) -> None:
    assert load({"CKPT_SIGNAL": raw}).signal is expected


def test_choices_are_case_insensitive_and_stripped() -> None:
    loaded = load({"CKPT_RESTORE": " NEVER ", "CKPT_TCP": "Established", "CKPT_LOG_LEVEL": "WARNING"})
    assert (loaded.restore, loaded.tcp, loaded.log_level) == ("never", "established", "warning")


def test_a_trailing_slash_on_the_checkpoint_dir_is_dropped_but_root_stays_root() -> None:
    assert load({"CKPT_DIR": "/mnt/shared/"}).dir == "/mnt/shared"
    assert load({"CKPT_DIR": "/"}).dir == "/"


def test_keep_tolerates_surrounding_spaces() -> None:
    assert load({"CKPT_KEEP": " 3 "}).keep == 3


# --- flags override the environment ----------------------------------------------------
def test_a_flag_overrides_its_environment_variable() -> None:
    loaded = load({"CKPT_RESTORE": "never", "CKPT_KEEP": "9"}, {"restore": "require", "keep": None})
    assert loaded.restore == "require"
    assert loaded.keep == 9  # a flag left unset (None) does not hide the variable


def test_a_valid_flag_wins_over_a_bad_variable_which_is_then_not_parsed() -> None:
    assert load({"CKPT_RESTORE": "maybe"}, {"restore": "never"}).restore == "never"


# --- strict rejection ---------------------------------------------------------------------
BAD_VALUES = [
    # (variable, raw value, words the message must contain besides the variable)
    ("CKPT_RESTORE", "maybe", ["auto", "never", "require"]),
    ("CKPT_SIGNAL", "SIGKILL", ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPWR"]),
    ("CKPT_SIGNAL", "SIGCHLD", ["SIGTERM"]),
    ("CKPT_SIGNAL", "15", ["SIGTERM"]),
    ("CKPT_TCP", "x", ["close", "established"]),
    ("CKPT_DIR", "relative/path", ["absolute"]),
    ("CKPT_DIR", "./checkpoints", ["absolute"]),
    ("CKPT_NAME", "a/b", ["letters, digits"]),
    ("CKPT_NAME", ".hidden", ["starting with a letter or digit"]),
    ("CKPT_NAME", "..", ["starting with a letter or digit"]),
    ("CKPT_NAME", "x" * 101, ["1-100"]),
    ("CKPT_KEEP", "0", ["a whole number from 1 to 100"]),
    ("CKPT_KEEP", "-1", ["from 1 to 100"]),
    ("CKPT_KEEP", "abc", ["from 1 to 100"]),
    ("CKPT_KEEP", "1.5", ["a whole number from 1 to 100"]),
    ("CKPT_KEEP", "101", ["from 1 to 100"]),
    ("CKPT_KEEP", "1e2", ["from 1 to 100"]),
    ("CKPT_LOG_LEVEL", "loud", ["debug", "info", "warning", "error"]),
    ("CKPT_CRIU_LOG_LEVEL", "5", ["0", "1", "2", "3", "4"]),
    ("CKPT_LEASE_INTERVAL", "0", ["a number of seconds from 0.1 to 3600"]),
    ("CKPT_LEASE_INTERVAL", "-5", ["from 0.1 to 3600"]),
    ("CKPT_LEASE_INTERVAL", "5s", ["from 0.1 to 3600"]),
    ("CKPT_LEASE_INTERVAL", "nan", ["from 0.1 to 3600"]),
    ("CKPT_LEASE_INTERVAL", "inf", ["from 0.1 to 3600"]),
    ("CKPT_LEASE_INTERVAL", "1e300", ["from 0.1 to 3600"]),
    ("CKPT_LEASE_TIMEOUT", "0", ["from 0.2 to 86400"]),
    ("CKPT_LEASE_TIMEOUT", "half a minute", ["from 0.2 to 86400"]),
    ("CKPT_HANDOFF_TIMEOUT", "-1", ["from 0 to 86400"]),
    ("CKPT_HANDOFF_TIMEOUT", "-0", ["from 0 to 86400"]),
    ("CKPT_HANDOFF_TIMEOUT", "5m", ["from 0 to 86400"]),
    ("CKPT_HANDOFF_TIMEOUT", "inf", ["from 0 to 86400"]),
    ("CKPT_HANDOFF_TIMEOUT", "86401", ["from 0 to 86400"]),
    ("CKPT_INTERVAL", "1e300", ["0 (off) or a number of seconds from 1 to 86400"]),
    ("CKPT_INTERVAL", "0.5", ["0 (off) or a number of seconds from 1 to 86400"]),
    ("CKPT_INTERVAL", "-0", ["0 (off)"]),
    ("CKPT_DEADLINE_MARGIN", "3601", ["from 0 to 3600"]),
    ("CKPT_POLL_INTERVAL", "61", ["from 0.1 to 60"]),
    ("CKPT_POLL_INTERVAL", "0.05", ["from 0.1 to 60"]),
    ("CKPT_RESTORE_STALL", "1e300", ["from 1 to 3600"]),
    ("CKPT_RESTORE_STALL", "0.5", ["from 1 to 3600"]),
    ("CKPT_METRICS_PORT", "65536", ["0 (off) or a TCP port from 1 to 65535"]),
    ("CKPT_METRICS_PORT", "-1", ["0 (off) or a TCP port from 1 to 65535"]),
    ("CKPT_METRICS_PORT", "0x1F90", ["TCP port"]),
    ("CKPT_METRICS_ADDRESS", "localhost", ["IPv4 or IPv6 address", "0.0.0.0"]),
    ("CKPT_METRICS_ADDRESS", "1.2.3", ["IPv4 or IPv6 address"]),
    ("CKPT_METRICS_ADDRESS", "fe80::1%eth0", ["IPv4 or IPv6 address"]),
    ("CKPT_CONTROL_SOCKET", "run/criu-supervisor.sock", ["absolute"]),
    ("CKPT_CONTROL_SOCKET", "/", ["/proc, /sys or /dev"]),
    ("CKPT_CONTROL_SOCKET", "/proc/self/fd/0", ["/proc, /sys or /dev"]),
    ("CKPT_CONTROL_SOCKET", "/dev/shm/control.sock", ["/proc, /sys or /dev"]),
    ("CKPT_CONTROL_SOCKET", "/run/../proc/control.sock", ["'.' or '..'"]),
    ("CKPT_CONTROL_SOCKET", "/run/" + "s" * 103, ["at most 107 bytes", "this one is 108"]),
    ("CKPT_CONTROL_SOCKET", "/run/\x00.sock", ["printable"]),
    ("CKPT_DIR", "/mnt/\x00shared", ["printable"]),
    ("CKPT_DIR", "/mnt/" + "d" * 256, ["each name in it at most 255"]),
    ("CKPT_AWS_METADATA_URL", "http://[::1", ["http:// or https:// URL"]),
    ("CKPT_AWS_METADATA_URL", "http://169.254.169.254:99999", ["http:// or https:// URL"]),
    ("CKPT_GCP_METADATA_URL", "http://metadata/?x=1", ["no user, query or fragment"]),
    ("CKPT_AZURE_METADATA_URL", "ftp://169.254.169.254", ["http:// or https:// URL"]),
    ("CKPT_SIGNAL", "\u017fIGTERM", ["SIGTERM"]),  # 'ſ'.upper() is 'S'
    ("CKPT_SIGNING_KEY_FILE", "secrets/key", ["absolute"]),
    ("CKPT_STATE_PATHS", "var/lib/app", ["absolute paths separated by ':'"]),
    ("CKPT_STATE_PATHS", "/var/lib/app:data", ["absolute paths separated by ':'"]),
    ("CKPT_STATE_PATHS", "/var/lib/../../proc", ["absolute paths separated by ':'"]),
    ("CKPT_STATE_PATHS", "/var/lib/app/..", ["absolute paths separated by ':'"]),
    ("CKPT_STATE_PATHS", "/", ["/ cannot be carried"]),
    ("CKPT_STATE_PATHS", "/var/lib/app:/proc", ["/proc cannot be carried"]),
    ("CKPT_STATE_PATHS", "/sys/", ["/sys/ cannot be carried"]),
    ("CKPT_STATE_PATHS", "/dev", ["/dev cannot be carried"]),
]


@pytest.mark.parametrize(("variable", "raw", "hints"), BAD_VALUES, ids=lambda v: v if isinstance(v, str) else "")
def test_a_bad_variable_is_refused_naming_the_variable_and_what_is_accepted(
    variable: str, raw: str, hints: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load({variable: raw})
    message = caught.value.message
    assert message.startswith(f"{variable}={raw!r} is not valid")
    for hint in hints:
        assert hint in message


@pytest.mark.parametrize(("variable", "raw", "hints"), BAD_VALUES, ids=lambda v: v if isinstance(v, str) else "")
def test_a_bad_flag_is_refused_naming_the_flag_and_its_variable(variable: str, raw: str, hints: list[str]) -> None:
    setting = next(s for s in SETTINGS if s.variable == variable)
    with pytest.raises(ConfigError) as caught:
        load({}, {setting.field: raw})
    message = caught.value.message
    assert message.startswith(f"{setting.flag} ({variable})={raw!r} is not valid")
    for hint in hints:
        assert hint in message


def test_the_accepted_checkpoint_signals_are_listed_in_the_message_in_full() -> None:
    accepted = "accepted values are SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGPWR"
    with pytest.raises(ConfigError, match=accepted):
        load({"CKPT_SIGNAL": "SIGSTOP"})


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigError):
        load({"CKPT_NAME": "app\n"})


# --- the lease, signing and carried-files settings --------------------------------------------------
def test_the_lease_timeout_must_be_at_least_twice_the_interval_or_a_slow_beat_looks_dead() -> None:
    with pytest.raises(ConfigError) as caught:
        load({"CKPT_LEASE_INTERVAL": "5", "CKPT_LEASE_TIMEOUT": "9.5"})
    message = caught.value.message
    assert message.startswith("CKPT_LEASE_TIMEOUT=9.5 is not valid")
    assert "at least twice" in message and "CKPT_LEASE_INTERVAL (5)" in message


def test_the_default_lease_timeout_is_checked_against_a_longer_interval() -> None:
    with pytest.raises(ConfigError, match="CKPT_LEASE_TIMEOUT=30 is not valid"):
        load({"CKPT_LEASE_INTERVAL": "16"})


def test_the_lease_interval_and_timeout_flags_are_checked_against_each_other_too() -> None:
    with pytest.raises(ConfigError, match="at least twice"):
        load({"CKPT_LEASE_TIMEOUT": "10"}, {"lease_interval": "6"})


def test_a_lease_timeout_of_exactly_twice_the_interval_is_accepted() -> None:
    loaded = load({"CKPT_LEASE_INTERVAL": "2.5", "CKPT_LEASE_TIMEOUT": "5"})
    assert (loaded.lease_interval, loaded.lease_timeout) == (2.5, 5.0)


def test_a_handoff_timeout_of_zero_means_do_not_wait() -> None:
    assert load({"CKPT_HANDOFF_TIMEOUT": "0"}).handoff_timeout == 0.0


def test_without_a_signing_key_file_manifests_are_not_signed() -> None:
    assert load({}).signing_key_file is None
    assert load({"CKPT_SIGNING_KEY_FILE": "/run/secrets/key/"}).signing_key_file == "/run/secrets/key"


def test_state_paths_are_split_on_colons_with_empty_parts_and_trailing_slashes_dropped() -> None:
    assert load({"CKPT_STATE_PATHS": "/var/lib/app/::/home/app/.cache:"}).state_paths == (
        "/var/lib/app", "/home/app/.cache",
    )


@pytest.mark.parametrize("raw", ["/proc/sys", "/sys/fs/cgroup", "/dev/mqueue"])
def test_a_state_path_inside_proc_sys_or_dev_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="cannot be carried"):
        load({"CKPT_STATE_PATHS": raw})


# --- bounds of every number ----------------------------------------------------------------------------------
# (minimum, maximum, whether 0 is also accepted, meaning off): the documented range of every number.
EXPECTED_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "CKPT_KEEP": (1, 100, False),
    "CKPT_LEASE_INTERVAL": (0.1, 3600, False),
    "CKPT_LEASE_TIMEOUT": (0.2, 86400, False),
    "CKPT_HANDOFF_TIMEOUT": (0, 86400, False),
    "CKPT_INTERVAL": (1, 86400, True),
    "CKPT_DEADLINE_MARGIN": (0, 3600, False),
    "CKPT_POLL_INTERVAL": (0.1, 60, False),
    "CKPT_RESTORE_STALL": (1, 3600, False),
    "CKPT_METRICS_PORT": (1, 65535, True),
}
WHOLE_NUMBERS = {"CKPT_KEEP", "CKPT_METRICS_PORT"}


def _numbers() -> list[config.Setting]:
    return [s for s in SETTINGS if s.variable in EXPECTED_BOUNDS]


def _alone(variable: str, raw: str) -> dict[str, str]:
    """`variable=raw`, with a lease timeout that does not trip the cross-check with a long lease interval."""
    environment = {variable: raw}
    if variable == "CKPT_LEASE_INTERVAL":
        environment["CKPT_LEASE_TIMEOUT"] = "86400"
    if variable == "CKPT_LEASE_TIMEOUT":
        environment["CKPT_LEASE_INTERVAL"] = "0.1"
    return environment


def test_every_number_setting_has_documented_bounds() -> None:
    numbers = {s.variable for s in SETTINGS if s.variable.endswith(("_INTERVAL", "_TIMEOUT", "_MARGIN", "_STALL",
                                                                      "_PORT", "_KEEP"))}
    assert numbers == set(EXPECTED_BOUNDS)


@pytest.mark.parametrize("setting", _numbers(), ids=lambda s: s.variable)
def test_the_table_shows_the_accepted_range_of_every_number(setting: config.Setting) -> None:
    minimum, maximum, zero_is_off = EXPECTED_BOUNDS[setting.variable]
    unit = "" if setting.variable in WHOLE_NUMBERS else " s"
    accepted = f"{minimum:g}-{maximum:g}{unit}"
    expected = f"Accepted: 0 (off) or {accepted}." if zero_is_off else f"Accepted: {accepted}."
    assert setting.help.endswith(expected)
    row = f"| `{setting.variable}` | `{setting.flag}` | `{setting.default}` | {setting.help} |"
    assert row in config.describe_table()


@pytest.mark.parametrize("setting", _numbers(), ids=lambda s: s.variable)
def test_the_bounds_of_every_number_are_accepted(setting: config.Setting) -> None:
    minimum, maximum, zero_is_off = EXPECTED_BOUNDS[setting.variable]
    for value in (minimum, maximum, *([0] if zero_is_off else [])):
        assert getattr(load(_alone(setting.variable, f"{value:g}")), setting.field) == value


@pytest.mark.parametrize("setting", _numbers(), ids=lambda s: s.variable)
@pytest.mark.parametrize("where", ["below", "above", "huge"])
def test_a_number_out_of_its_range_is_refused_naming_the_variable_value_and_range(
    setting: config.Setting, where: str
) -> None:
    minimum, maximum, zero_is_off = EXPECTED_BOUNDS[setting.variable]
    step = 1 if setting.variable in WHOLE_NUMBERS else 0.01
    below, above = (f"{value:.2f}".rstrip("0").rstrip(".") for value in (minimum - step, maximum + step))
    raw = {"below": below, "above": above, "huge": "1" + "0" * 19}[where]
    if raw in ("0", "-0") and zero_is_off or raw.startswith("-") and minimum == 0:
        raw = "-1"
    with pytest.raises(ConfigError) as caught:
        load(_alone(setting.variable, raw))
    message = caught.value.message
    assert message.startswith(f"{setting.variable}={raw!r} is not valid: expected ")
    assert f"from {minimum:g} to {maximum:g}" in message
    assert ("0 (off) or" in message) == zero_is_off


@pytest.mark.parametrize("variable", ["CKPT_INTERVAL", "CKPT_LEASE_INTERVAL", "CKPT_RESTORE_STALL",
                                      "CKPT_HANDOFF_TIMEOUT", "CKPT_DEADLINE_MARGIN", "CKPT_POLL_INTERVAL"])
def test_1e300_seconds_is_refused_before_it_overflows_the_time_arithmetic(variable: str) -> None:
    # Red team: CKPT_INTERVAL=1e300 crashed the loop (OverflowError); CKPT_LEASE_INTERVAL=1e300 killed the heartbeat.
    with pytest.raises(ConfigError, match=f"^{variable}='1e300' is not valid: expected"):
        load(_alone(variable, "1e300"))


@pytest.mark.parametrize("raw", ["-0", "-0.0", "+5", "1_000", "0x10", "1e1", "\u0661\u0662", "5\uff10", "nan", "NaN",
                                 "inf", "-inf", "Infinity", "1e309", "5s", "5 s", "", " ", "9" * 5000])
def test_only_plain_decimals_are_numbers(raw: str) -> None:
    for variable in ("CKPT_HANDOFF_TIMEOUT", "CKPT_KEEP", "CKPT_METRICS_PORT"):
        setting = next(s for s in SETTINGS if s.variable == variable)
        with pytest.raises(ConfigError):
            setting.parse(variable, raw)


@pytest.mark.parametrize(("raw", "expected"), [(" 5 ", 5.0), ("5.", 5.0), (".5", 0.5), ("007", 7.0), ("0.0", 0.0)])
def test_plain_decimals_with_surrounding_spaces_are_numbers(raw: str, expected: float) -> None:
    value = load({"CKPT_HANDOFF_TIMEOUT": raw}).handoff_timeout
    assert value == expected and str(value) != "-0.0"


# --- nothing a value can hold makes a traceback ---------------------------------------------------------------
NASTY_VALUES = [
    "", " ", "\t\n", "x" * 100_000, "\x00", "5\x00", "/\x00", "\u0661\u0662", "0x10", "1_000", "+5", " 5 ", "5s",
    "-0", "-0.0", "nan", "inf", "-inf", "1e309", "1e300", "9" * 5000, "\udcff", "/\udcff", "\n", "..", "/..", "//",
    "/proc", "/" + "a" * 300, "/" * 5000, "http://[::1", "http://h:99999", "http://h:-1", "http://", "https://h\n",
    "fe80::1%eth0", "::ffff:1.2.3.4", "\u017figterm", "\u212a", "auto,\u212a", ",", "0", "1", "-1", "1.5",
]


def _check_parsed(setting: config.Setting, value: object) -> None:
    if isinstance(value, float | int) and not isinstance(value, bool):
        assert math.isfinite(value) and math.copysign(1, value) == 1, (setting.variable, value)
        if setting.variable in EXPECTED_BOUNDS:
            minimum, maximum, zero_is_off = EXPECTED_BOUNDS[setting.variable]
            assert (zero_is_off and value == 0) or minimum <= value <= maximum


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.variable)
def test_every_parser_either_parses_a_nasty_value_within_bounds_or_refuses_it_in_one_line(
    setting: config.Setting,
) -> None:
    for raw in NASTY_VALUES:
        try:
            value = setting.parse(setting.variable, raw)
        except ConfigError as error:
            assert "\n" not in error.message and len(error.message) < 600, (setting.variable, raw[:20])
            assert error.message.startswith(setting.variable), (setting.variable, raw[:20])
            continue
        _check_parsed(setting, value)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.variable)
def test_load_either_accepts_a_nasty_value_or_refuses_it_with_a_config_error(setting: config.Setting) -> None:
    for raw in NASTY_VALUES:
        for environment, flags in (({setting.variable: raw}, None), ({}, {setting.field: raw})):
            try:
                loaded = load(environment, flags)
            except ConfigError:
                continue
            _check_parsed(setting, getattr(loaded, setting.field))


# --- the control socket and metrics settings ------------------------------------------------------------------
def test_a_control_socket_path_of_107_bytes_is_accepted_and_108_refused() -> None:
    longest = "/run/" + "s" * 102
    assert len(longest.encode()) == 107
    assert load({"CKPT_CONTROL_SOCKET": longest}).control_socket == longest
    with pytest.raises(ConfigError, match="at most 107 bytes"):
        load({"CKPT_CONTROL_SOCKET": longest + "s"})
    with pytest.raises(ConfigError, match="at most 107 bytes"):
        load({"CKPT_CONTROL_SOCKET": "/run/" + "\u00e9" * 52})  # 104 bytes in UTF-8, 57 characters


def test_the_control_socket_may_not_be_on_the_shared_volume() -> None:
    with pytest.raises(ConfigError) as caught:
        load({"CKPT_DIR": "/checkpoints", "CKPT_CONTROL_SOCKET": "/checkpoints/control.sock"})
    assert caught.value.message.startswith("CKPT_CONTROL_SOCKET='/checkpoints/control.sock' is not valid")
    assert "inside CKPT_DIR (/checkpoints)" in caught.value.message
    assert load({"CKPT_DIR": "/checkpoints", "CKPT_CONTROL_SOCKET": "/checkpoints2.sock"}).control_socket


def test_the_metrics_address_defaults_to_every_ipv4_address_so_prometheus_can_scrape_the_pod() -> None:
    assert load({}).metrics_address == "0.0.0.0"


@pytest.mark.parametrize(("raw", "expected"), [("127.0.0.1", "127.0.0.1"), ("::", "::"), (" ::1 ", "::1"),
                                               ("0:0::0", "::"), ("10.1.2.3", "10.1.2.3")])
def test_the_metrics_address_accepts_ipv4_and_ipv6_literals(raw: str, expected: str) -> None:
    assert load({"CKPT_METRICS_ADDRESS": raw}).metrics_address == expected


# --- variables that are not settings -------------------------------------------------------------------------
def test_a_misspelt_setting_is_named_with_the_closest_one() -> None:
    assert config.unknown_variables({"CKPT_INTERVALL": "60"}) == [
        "CKPT_INTERVALL is not a criu-supervisor setting (did you mean CKPT_INTERVAL?); it is ignored"
    ]


def test_a_lower_case_setting_is_named_with_the_real_one() -> None:
    assert config.unknown_variables({"ckpt_keep": "3"}) == [
        "ckpt_keep is not a criu-supervisor setting (did you mean CKPT_KEEP?); it is ignored"
    ]


def test_an_unknown_variable_with_nothing_close_points_to_the_readme() -> None:
    assert config.unknown_variables({"CKPT_ZZZZZZZZZZZZZZ": "1"}) == [
        "CKPT_ZZZZZZZZZZZZZZ is not a criu-supervisor setting (the settings are listed in the README); it is ignored"
    ]


def test_settings_the_variables_the_package_reads_and_other_variables_are_not_warned_about() -> None:
    environment = {s.variable: s.default for s in SETTINGS}
    environment.update({name: "x" for name in config.NOT_SETTINGS})
    environment.update({"PATH": "/bin", "CKPTDIR": "/x", "HOSTNAME": "h"})
    assert config.unknown_variables(environment) == []


def test_unknown_variables_are_warned_about_in_order_and_at_most_twenty_lines_plus_one() -> None:
    warnings = config.unknown_variables({f"CKPT_X{index:03d}": "" for index in range(50)} | {"CKPT_A\n": ""})
    assert len(warnings) == 21 and warnings[-1].startswith("... and 31 more")
    assert warnings[0].startswith("'CKPT_A\\n' is not a criu-supervisor setting")


def test_every_ckpt_variable_the_package_reads_is_a_setting_or_in_the_allow_list() -> None:
    package = Path(config.__file__).parent
    read = set()
    for source in package.rglob("*.py"):
        read |= set(re.findall(r"""environ(?:\.get\(|\[)\s*["'](CKPT_[A-Z0-9_]+)""", source.read_text()))
    settings = {s.variable for s in SETTINGS}
    assert read - settings <= config.NOT_SETTINGS, "add it to config.NOT_SETTINGS, or make it a setting"
    assert read >= config.NOT_SETTINGS, "config.NOT_SETTINGS names a variable nothing reads any more"
