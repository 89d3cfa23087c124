"""config.load: defaults, environment parsing, flag precedence, strict rejection."""

from __future__ import annotations

import dataclasses
import signal

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
def test_the_checkpoint_signal_accepts_names_with_or_without_sig_in_any_case(raw: str, expected: signal.Signals) -> None:
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
    ("CKPT_KEEP", "0", [">= 1"]),
    ("CKPT_KEEP", "-1", [">= 1"]),
    ("CKPT_KEEP", "abc", [">= 1"]),
    ("CKPT_KEEP", "1.5", [">= 1"]),
    ("CKPT_LOG_LEVEL", "loud", ["debug", "info", "warning", "error"]),
    ("CKPT_CRIU_LOG_LEVEL", "5", ["0", "1", "2", "3", "4"]),
    ("CKPT_LEASE_INTERVAL", "0", ["> 0"]),
    ("CKPT_LEASE_INTERVAL", "-5", [">= 0"]),
    ("CKPT_LEASE_INTERVAL", "5s", [">= 0"]),
    ("CKPT_LEASE_INTERVAL", "nan", [">= 0"]),
    ("CKPT_LEASE_INTERVAL", "inf", [">= 0"]),
    ("CKPT_LEASE_TIMEOUT", "0", ["> 0"]),
    ("CKPT_LEASE_TIMEOUT", "half a minute", [">= 0"]),
    ("CKPT_HANDOFF_TIMEOUT", "-1", [">= 0"]),
    ("CKPT_HANDOFF_TIMEOUT", "5m", [">= 0"]),
    ("CKPT_HANDOFF_TIMEOUT", "inf", [">= 0"]),
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
    with pytest.raises(ConfigError, match="accepted values are SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGPWR"):
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
