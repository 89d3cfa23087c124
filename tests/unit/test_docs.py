"""The README's settings table is the code's: a new or changed setting must be documented."""

from __future__ import annotations

from pathlib import Path

from supervisor_pkg.config import describe_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_matches_config() -> None:
    assert describe_table() in README.read_text(), (
        "README.md's settings table is out of date: paste the output of "
        "`python -c 'from supervisor_pkg.config import describe_table; print(describe_table())'`"
    )


def test_every_exit_code_in_the_cli_contract_is_in_the_readme() -> None:
    from supervisor_pkg.cli import EXIT_CODES

    text = README.read_text()
    for code in set(EXIT_CODES.values()) - {0}:
        assert f"| `{code}` |" in text, f"exit code {code} is not documented in README.md"
