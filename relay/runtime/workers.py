"""``relay serve --workers N``: N relay processes on one port, so a relay uses every core.

One relay process is one event loop on one core. The supervisor (this module, the process
``relay serve --workers N`` runs in) starts N *workers*: ordinary relay processes
(``python -m relay serve --worker-index I``) that each bind the same port with
SO_REUSEPORT, so the kernel spreads new connections over them. A stream lives in the worker
that accepted its ``start``; since a reconnect may land on any worker, workers need
``--redis``: through it they share streams (relay.cluster.replication), so ``resume`` and
``cancel`` work whichever worker a connection lands on. Without ``--redis`` more than one
worker is refused (exit 2).

Lifecycle::

    supervisor: reserve the port (a bound, non-listening SO_REUSEPORT socket: port 0
                resolves once, for every worker; it never receives a connection)
                start N workers, each with the supervisor's resolved settings in RELAY_*
                environment variables; wait for each to print its ready line
                -> print "llm-relay listening on ..." (one line, as a single relay does)
    running:    a worker that exits is started again (after 1 s, also if the new one fails
                before it is ready, e.g. while Redis is down); a worker that fails before
                the first start completed stops the whole start (its exit code, e.g. 2)
    SIGTERM/SIGINT: sent on to every worker, each drains as a single relay does (with Redis:
                closes its connections 1012, finishes its upstream calls into Redis, for up
                to drain_timeout), then the supervisor exits 0. Workers still running
                drain_timeout + 15 s later are killed. Workers also get SIGTERM from the
                kernel if the supervisor dies (PR_SET_PDEATHSIG, e.g. ``kill -9`` of the
                supervisor): no orphans, and each drains just the same (their stdout, the
                dead supervisor's pipe, then goes to their stderr).

Metrics: every worker has its own numbers. Each registers ``relay_worker_info{worker,pid}``
(value 1). With ``--metrics-port``, the supervisor serves ``/metrics`` there: every worker's
samples, each with a ``worker="I"`` label (sum them in queries for the relay's totals), plus
``relay_workers`` (workers running) and ``relay_worker_restarts_total``; the workers then
serve theirs on private loopback ports only. Without ``--metrics-port``, ``/metrics`` on the
shared port is answered by whichever worker the request lands on (its own numbers; the
info metric says which): scrape ``--metrics-port`` to see all workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import http
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relay.aio import cancel_and_wait

if TYPE_CHECKING:
    # (Types only: a worker imports none of these before it needs them.)
    from websockets.asyncio.server import Server, ServerConnection
    from websockets.http11 import Request, Response

    from relay.config import RelaySettings

__all__ = ["READY_PREFIX", "Supervisor", "outlived_supervisor", "parse_workers",
           "settings_environment", "worker_ready_line", "write_stdout_to_stderr"]

logger = logging.getLogger("relay.runtime.workers")

#: A worker announces it listens with this prefix and a JSON object on one stdout line.
READY_PREFIX = "llm-relay-worker "

_READY_TIMEOUT = 300.0     # importing LiteLLM takes seconds, more on a loaded machine
_RESTART_DELAY = 1.0
_KILL_AFTER_DRAIN = 15.0
_SCRAPE_TIMEOUT = 5.0


def parse_workers(value: str) -> int:
    """``--workers`` value: a positive integer or ``auto`` (the CPUs this process may use)."""
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"--workers must be a positive integer or 'auto', not {value!r}")
    if count < 1:
        raise ValueError(f"--workers must be at least 1, not {count}")
    return count


def settings_environment(settings: RelaySettings) -> dict[str, str | None]:
    """``settings`` as the ``RELAY_*`` environment variables that rebuild them in a worker
    (None: the variable must be absent). Secrets included: the environment of a child
    process is as private as the supervisor's own."""
    from pydantic import SecretStr

    prefix = type(settings).model_config.get("env_prefix", "")
    dumped = settings.model_dump(mode="json")
    env: dict[str, str | None] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        else:
            value = dumped[name]
        key = f"{prefix}{name}".upper()
        if value is None:
            env[key] = None
        else:
            env[key] = value if isinstance(value, str) else json.dumps(value)
    return env


def worker_ready_line(index: int, metrics_port: int | None, models: list[str]) -> str:
    """The line a worker prints (flushed) once it listens."""
    return READY_PREFIX + json.dumps({"index": index, "pid": os.getpid(),
                                      "metrics_port": metrics_port, "models": models})


def outlived_supervisor(supervisor_pid: int) -> bool:
    """In a worker, once it was told to stop: True if the supervisor that started it
    (``supervisor_pid``, its parent then) is gone, i.e. the SIGTERM came from the kernel
    (PR_SET_PDEATHSIG) because the supervisor died, e.g. ``kill -9``.

    The worker then drains exactly as on a SIGTERM from the supervisor; only its stdout, a
    pipe nobody reads any more, would fail the next write (``BrokenPipeError``), so from now
    on the worker's stdout goes where its stderr goes (inherited from the supervisor)."""
    if os.getppid() == supervisor_pid:
        return False
    write_stdout_to_stderr()
    logger.warning("the supervisor (pid %d) is gone; draining as on SIGTERM", supervisor_pid)
    return True


def write_stdout_to_stderr() -> None:
    """Point file descriptor 1 at what descriptor 2 is (``sys.stdout`` keeps writing to 1)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    os.dup2(2, 1)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGTERM when the supervisor dies, however.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - not Linux: the supervisor's SIGTERM still works
        pass


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    pid: int | None = None
    metrics_port: int | None = None
    ready: asyncio.Future[None] | None = None
    restarts: int = 0
    forward: asyncio.Task | None = None


@dataclass
class _Stats:
    restarts: int = 0
    workers: list[_Worker] = field(default_factory=list)


class Supervisor:
    """Runs ``count`` workers with ``settings`` (a resolved ``RelaySettings``) until
    SIGTERM/SIGINT; see the module docstring. ``run()`` returns the exit code."""

    def __init__(self, settings: RelaySettings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.models: list[str] = []      # as the workers report them
        self.port: int | None = None
        self._reservation: socket.socket | None = None
        self._stats = _Stats()
        self._stopping = False
        self._failed_start: int | None = None
        self._fatal = asyncio.Event()
        self._started = False     # every worker was ready once; from then on: restart

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        s = self.settings
        try:
            self.port = self._reserve_port(s.host, s.port)
        except OSError as exc:
            print(f"relay: cannot listen on {s.host}:{s.port}: {exc.strerror}; "
                  "pick another --port or stop what uses it", file=sys.stderr)
            return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        metrics_http = None
        # The futures run() waits on; whichever way run() ends, each is done (cancelled if
        # need be, and awaited) before it returns.
        waits: list[asyncio.Future[Any]] = []
        try:
            self._stats.workers = [_Worker(i) for i in range(self.count)]
            for worker in self._stats.workers:
                await self._spawn(worker)
            startup = asyncio.gather(*(w.ready for w in self._stats.workers
                                       if w.ready is not None))   # (each has one: _spawn)
            stop_wait = asyncio.ensure_future(stop.wait())
            fatal_wait = asyncio.ensure_future(self._fatal.wait())
            waits += (startup, stop_wait, fatal_wait)
            first: set[asyncio.Future[Any]] = {startup, stop_wait, fatal_wait}
            done, _ = await asyncio.wait(first,
                                         timeout=_READY_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
            if startup not in done or self._failed_start is not None:
                # (A cancellation of run() itself while this waits propagates.)
                await cancel_and_wait(startup)
                if not done:
                    print(f"relay: workers not ready within {_READY_TIMEOUT:g} s",
                          file=sys.stderr)
                code = self._failed_start if self._failed_start is not None else \
                    (0 if stop.is_set() else 1)
                await self._stop_all()
                return code
            fatal_wait.cancel()
            self._started = True
            if s.metrics_port is not None:
                metrics_http = _AggregateMetricsServer(self, s.host, s.metrics_port)
                try:
                    await metrics_http.start()
                except OSError as exc:
                    metrics_http = None
                    print(f"relay: cannot serve metrics on {s.host}:{s.metrics_port}: "
                          f"{exc.strerror}", file=sys.stderr)
                    stop_wait.cancel()
                    await self._stop_all()
                    return 2
            pids = ", ".join(str(w.pid) for w in self._stats.workers)
            print(f"llm-relay listening on ws://{s.host}:{self.port}/ws (protocol llm-relay.v1)"
                  f"; {self.count} workers (pids {pids}); models: {', '.join(self.models)}",
                  flush=True)
            if metrics_http is not None:
                print(f"llm-relay metrics on http://{s.host}:{metrics_http.port}/metrics "
                      "(all workers, label worker)", flush=True)
            await stop_wait
            print(f"llm-relay draining {self.count} workers (up to {s.drain_timeout:g} s), "
                  "then closing", flush=True)
            return await self._stop_all()
        finally:
            try:
                if metrics_http is not None:
                    await metrics_http.close()
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
                if self._reservation is not None:
                    self._reservation.close()
                for wait in waits:
                    wait.cancel()
                # Their own cancellations are absorbed; one of run() propagates.
                await asyncio.gather(*waits, return_exceptions=True)

    def _reserve_port(self, host: str, port: int) -> int:
        family, type_, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self._reservation = sock
        return sock.getsockname()[1]

    # ------------------------------------------------------------------ workers

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in settings_environment(self.settings).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        env["RELAY_PORT"] = str(self.port)
        if self.settings.metrics_port is not None:
            env["RELAY_METRICS_PORT"] = "0"   # private, on loopback; the supervisor serves
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def _spawn(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        worker.ready = loop.create_future()
        worker.metrics_port = None
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", "--worker-index", str(worker.index),
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
            env=self._worker_env(), preexec_fn=_die_with_parent)
        worker.process = process
        worker.pid = process.pid
        if self._stopping:   # a restart that crossed the shutdown
            process.send_signal(signal.SIGTERM)
        worker.forward = asyncio.create_task(self._watch(worker, process),
                                             name=f"worker {worker.index}")

    async def _watch(self, worker: _Worker, process: asyncio.subprocess.Process) -> None:
        """Read the worker's stdout (ready line; the rest is passed on), then its exit."""
        assert process.stdout is not None and worker.ready is not None
        ready = worker.ready
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if not ready.done():
                # Its own "listening" lines: the supervisor prints one for all workers.
                if line.startswith(READY_PREFIX):
                    info = json.loads(line[len(READY_PREFIX):])
                    worker.metrics_port = info.get("metrics_port")
                    self.models = self.models or list(info.get("models") or [])
                    ready.set_result(None)
                continue
            print(f"[worker {worker.index}] {line}", flush=True)
        code = await process.wait()
        if self._stopping:
            return
        if not ready.done() and not self._started:
            # Never became ready at startup: a configuration or environment problem (the
            # worker said why on stderr); restarting would fail the same way. run() stops.
            if self._failed_start is None:
                self._failed_start = code if code else 1
                self._fatal.set()
            return
        self._stats.restarts += 1
        worker.restarts += 1
        logger.warning("worker %d (pid %s) exited with code %s; starting it again",
                       worker.index, worker.pid, code)
        await asyncio.sleep(_RESTART_DELAY)   # pacing of restarts, not synchronisation
        if not self._stopping:
            await self._spawn(worker)

    async def _stop_all(self) -> int:
        """SIGTERM every worker, wait for them (drain), kill stragglers; the exit code."""
        self._stopping = True
        running = [w.process for w in self._stats.workers
                   if w.process is not None and w.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = self.settings.drain_timeout + _KILL_AFTER_DRAIN
        waits = [asyncio.ensure_future(p.wait()) for p in running]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=deadline)
            for process in running:
                if process.returncode is None:
                    logger.error("worker pid %s did not stop in %g s; killing it",
                                 process.pid, deadline)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        forwards = [w.forward for w in self._stats.workers if w.forward is not None]
        await asyncio.gather(*forwards, return_exceptions=True)
        codes = [p.returncode for p in running]
        return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1

    # ------------------------------------------------------------------ metrics

    async def render_metrics(self) -> bytes:
        """Every worker's metrics with a ``worker`` label, plus the supervisor's own."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        workers = [w for w in self._stats.workers if w.metrics_port is not None
                   and w.process is not None and w.process.returncode is None]
        ports = [w.metrics_port for w in workers if w.metrics_port is not None]
        texts = await asyncio.gather(*(_scrape(port) for port in ports),
                                     return_exceptions=True)
        families = _merge_families(
            (str(w.index), text) for w, text in zip(workers, texts) if isinstance(text, str))
        up = GaugeMetricFamily("relay_workers", "Worker processes running")
        up.add_metric([], len(workers))
        restarts = CounterMetricFamily("relay_worker_restarts",
                                       "Workers started again after they exited")
        restarts.add_metric([], self._stats.restarts)
        collected = [*families, up, restarts]

        class _Collector:
            def collect(self):
                return collected

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector())
        return generate_latest(registry)


def _merge_families(texts: Iterable[tuple[str, str]]) -> list:
    """Parse each worker's exposition text and merge families by name, every sample
    labelled ``worker``."""
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    merged: dict[str, Any] = {}
    for index, text in texts:
        for family in text_string_to_metric_families(text):
            samples = [Sample(sample.name, {**sample.labels, "worker": index}, sample.value,
                              sample.timestamp, sample.exemplar) for sample in family.samples]
            target = merged.setdefault(family.name, family)
            if target is family:
                family.samples = samples
            else:
                target.samples.extend(samples)
    return list(merged.values())


async def _scrape(port: int) -> str:
    """GET /metrics from a worker's private metrics port."""
    async with asyncio.timeout(_SCRAPE_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Connection: close\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            body = await (reader.readexactly(length) if length is not None else reader.read())
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(f"worker metrics answered {head.split(b' ')[1:2]}")
            return body.decode()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class _AggregateMetricsServer:
    """``/metrics`` of all workers on the supervisor's ``--metrics-port``."""

    def __init__(self, supervisor: Supervisor, host: str, port: int) -> None:
        self._supervisor = supervisor
        self.host = host
        self._requested_port = port
        self._server: Server | None = None

    async def start(self) -> None:
        from relay.http.metrics_http import serve_http_only

        self._server = await serve_http_only(self._process_request, self.host,
                                             self._requested_port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.close(close_connections=True)
            await server.wait_closed()

    async def _process_request(self, connection: ServerConnection,
                               request: Request) -> Response:
        import dataclasses

        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        if request.path.split("?", 1)[0] != "/metrics":
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        body = await self._supervisor.render_metrics()
        response = connection.respond(http.HTTPStatus.OK, "")
        del response.headers["Content-Type"], response.headers["Content-Length"]
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        response.headers["Content-Length"] = str(len(body))
        return dataclasses.replace(response, body=body)
