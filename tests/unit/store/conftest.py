"""Real redis-server fixtures shared by the Redis tests of the store: one server and a
3-node cluster per test module, and `url`, which runs a test on each."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_servers import RedisCluster, RedisServer


@pytest.fixture(scope="module")
def single() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as nodes:
        yield nodes


@pytest.fixture(params=["single", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(request.param).url
