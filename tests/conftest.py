"""Shared fixtures: a real `nats-server -js` on a random loopback port, unique bucket names."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from nats_apscheduler.embedded import EmbeddedNatsServer

_names = itertools.count()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    server = EmbeddedNatsServer(tmp_path_factory.mktemp("nats-js")).start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNatsServer) -> str:
    return nats_server.url


@pytest.fixture
def bucket() -> str:
    """A bucket name no other test uses (also unique across xdist workers)."""
    return f"t{os.getpid()}-{next(_names)}"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    """A server of the test's own, for tests that stop or restart it."""
    server = EmbeddedNatsServer(tmp_path / "js").start()
    yield server
    server.stop()
