"""A local redis-server on a free loopback port, for the demo, the benchmarks and the tests: not a
deployment (no persistence, no password), only a real server to try the shared tier against.
Needs Debian's `redis-server` on PATH (`apt-get install redis-server`; scripts/install.sh does it).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time

INSTALL = "apt-get install redis-server (and pip install redis hiredis)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server (no persistence) on 127.0.0.1:`port` (default: a free one), extra server
    arguments `args`. `stop` kills it and `start` brings it back on the same port (a server that
    goes away mid-stream and returns); `cleanup` stops it and removes its folder. The demo, the
    benchmarks and the tests (tests/redis_server.py) all start theirs with it."""

    def __init__(self, *args: str, port: int | None = None):
        if shutil.which("redis-server") is None:
            raise RuntimeError(f"redis-server is not installed: {INSTALL}")
        self.port = port or free_port()
        self.args = list(args)
        self.dir = tempfile.mkdtemp(prefix="llmcache-redis-")
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, **kwargs):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, **{"socket_timeout": 30, **kwargs})


@contextlib.contextmanager
def redis_server(*args: str):
    """A started RedisServer (extra server arguments `args`), stopped and its folder removed after."""
    server = RedisServer(*args).start()
    try:
        yield server
    finally:
        server.cleanup()


def redis_server_version() -> str | None:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((w[2:] for w in out.split() if w.startswith("v=")), out.strip() or None)


__all__ = ["INSTALL", "RedisServer", "free_port", "redis_server", "redis_server_version"]
