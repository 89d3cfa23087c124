from __future__ import annotations

from collections.abc import Iterator

import pytest
from dockerlib import BASE_IMAGE, KV_IMAGE, TICKER_IMAGE, Docker, docker


@pytest.fixture(scope="session", autouse=True)
def _images_exist() -> None:
    if docker("info", check=False).returncode != 0:
        pytest.exit("no Docker engine: run scripts/bootstrap.sh (scripts/test.sh does it for you)", returncode=1)
    for image in (BASE_IMAGE, TICKER_IMAGE, KV_IMAGE):
        if docker("image", "inspect", image, check=False).returncode != 0:
            pytest.exit(f"image {image} missing: run scripts/bootstrap.sh", returncode=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> Iterator[Docker]:
    factory = Docker()
    try:
        yield factory
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            factory.print_logs()  # shown under the failure: the containers are gone afterwards
        factory.cleanup()
