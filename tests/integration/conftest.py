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


@pytest.fixture
def engine() -> Iterator[Docker]:
    factory = Docker()
    try:
        yield factory
    finally:
        factory.cleanup()
