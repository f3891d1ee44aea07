"""Fixtures of the HTTP API tests: a scripted daemon and a client of the real app over it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient

from tests.http.doubles import ScriptedDaemon, start_client


@pytest.fixture
def daemon() -> ScriptedDaemon:
    return ScriptedDaemon()


@pytest.fixture
async def client(daemon: ScriptedDaemon) -> AsyncIterator[TestClient]:
    c = await start_client(daemon)
    yield c
    await c.close()
