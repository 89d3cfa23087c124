#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: sets up Docker and the images
# (scripts/bootstrap.sh), a Python virtualenv with the test tools, then pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k migration -x).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/bootstrap.sh

if [ ! -x .venv/bin/python ]; then
    if ! python3 -m venv .venv >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv .venv
    fi
    .venv/bin/pip install -q --upgrade pip >/dev/null
fi
# (Re)install whenever pyproject.toml changed, so new test dependencies arrive.
stamp=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
    .venv/bin/pip install -q -e '.[test]'
    echo "$stamp" > .venv/.installed
fi

exec .venv/bin/pytest "$@"
