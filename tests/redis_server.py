"""A private ``redis-server`` for tests that must stop, restart or freeze Redis.

    server = RedisServerProcess()      # or: with RedisServerProcess(password=...) as server:
    server.start()                     # free port, no persistence; returns when PING answers
    server.url                         # "redis://127.0.0.1:<port>/0"
    server.stop()                      # process gone; the port refuses connections
    server.restart()                   # same port, empty data set
    server.pause() / server.resume()   # SIGSTOP / SIGCONT: connections open, no answers
    server.close()                     # stop and remove the working directory; idempotent

Readiness is a PING polled against a deadline, never a fixed sleep. A missing
``redis-server`` binary raises ``RuntimeError`` (tests error loudly, never skip).
Also ``redis_ping(host, port)``: one PING over a raw socket, for "is Redis up" checks.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["RedisServerProcess", "redis_ping"]


def redis_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something on host:port answers an inline PING (``+PONG``, or ``-NOAUTH``
    from a server with a password: it is up and answering either way)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServerProcess:
    """One private redis-server on 127.0.0.1 (see module docstring)."""

    def __init__(self, *, password: str | None = None, start_timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH; install it (apt-get install "
                               "redis-server) - these tests need a real Redis")
        self.binary = binary
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.password = password
        self.start_timeout = start_timeout
        self._dir = Path(tempfile.mkdtemp(prefix="test-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        assert self.port is not None, "start() first"
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start on a free port (first call) or the previous port; return once PING answers."""
        if self.running:
            raise RuntimeError("redis-server already running")
        # A port found free may be taken before redis binds it; pick another a few times.
        # A fixed port (restart) gets no such retry: the caller asked for that port.
        attempts = 1 if self.port is not None else 5
        for attempt in range(attempts):
            port = self.port if self.port is not None else _free_port()
            if self._launch(port):
                self.port = port
                return
        raise RuntimeError(f"redis-server did not start; log:\n{self._log_tail()}")

    def _launch(self, port: int) -> bool:
        log = open(self._dir / "redis.log", "ab")
        try:
            self._proc = subprocess.Popen(
                [self.binary, "--port", str(port), "--bind", self.host, "--save", "",
                 "--appendonly", "no", "--dir", str(self._dir), "--daemonize", "no",
                 *(["--requirepass", self.password] if self.password else [])],
                stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False  # exited: port in use, bad flag... (log kept for the error)
            if redis_ping(self.host, port, timeout=0.2):
                return True
            time.sleep(0.02)  # poll interval of a bounded wait, not synchronisation
        self._kill()
        raise RuntimeError(f"redis-server on port {port} not ready after {self.start_timeout}s; "
                           f"log:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return (self._dir / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._paused:
            os.kill(proc.pid, signal.SIGCONT)
            self._paused = False
        proc.kill()
        proc.wait(timeout=10)

    def stop(self) -> None:
        """Kill the server (SIGKILL: an abrupt outage, as a crash would be); wait until gone."""
        self._kill()

    def restart(self) -> None:
        """Stop if running, then start again on the same port (empty data set)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): sockets stay open but nothing answers."""
        assert self._proc is not None and not self._paused
        os.kill(self._proc.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._proc is not None and self._paused
        os.kill(self._proc.pid, signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop and delete the working directory. Idempotent."""
        self._kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServerProcess:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
