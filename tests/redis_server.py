"""A real redis-server for the tests: started on a free loopback port, stopped after.

Needs Debian's `redis-server` on PATH (`scripts/install.sh` installs it); tests that use it
skip where it is absent. The server itself is the package's (`llmcache.shared.server.RedisServer`).
"""

from __future__ import annotations

import os
import shutil

import pytest

from llmcache.shared.server import RedisServer, free_port

__all__ = ["RedisServer", "free_port", "needs_redis", "redis_server"]


def needs_redis():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/install.sh installs it)")
    pytest.importorskip("redis")


@pytest.fixture
def redis_server():
    """A fresh redis-server for one test."""
    needs_redis()
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


os.environ.setdefault("HF_HUB_OFFLINE", "1")
