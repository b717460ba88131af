"""``relay serve --workers N`` as users run it (subprocesses): N processes on one port with
``--redis``, streams resumed and cancelled across workers, the supervisor's metrics, SIGTERM
draining every worker, no orphan when the supervisor dies, ``--workers`` refused without
Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed

from relay.upstream.demo import demo_reply_tokens

from .helpers import Client, eventually, start_relay, text_of
from .test_limits import ROOT, _env
from .test_multinode import SHARED_REDIS, prefix  # noqa: F401 (a fixture)

START_TIMEOUT = 180.0   # two workers importing LiteLLM on a loaded 2-core machine
PROMPT = "one worker starts this answer and another one carries it on " * 3
MESSAGES = [{"role": "user", "content": PROMPT}]
FULL_TEXT = "".join(demo_reply_tokens(MESSAGES))


class Supervised:
    """A ``relay serve --workers`` subprocess and what its first lines said."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, pids: list[int],
                 metrics_url: str | None) -> None:
        self.proc = proc
        self.url = url
        self.pids = pids
        self.metrics_url = metrics_url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    async def metrics(self) -> dict[tuple[str, tuple], float]:
        """The supervisor's aggregated ``/metrics``: (sample name, sorted labels) -> value."""
        assert self.metrics_url is not None
        port = int(self.metrics_url.rsplit(":", 1)[1].split("/")[0])
        return _samples(await _http_get(port, "/metrics"))


async def _http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _by_worker(samples: dict, name: str) -> dict[str, float]:
    return {dict(labels)["worker"]: value for (n, labels), value in samples.items()
            if n == name}


@contextlib.asynccontextmanager
async def supervised(*args: str, prefix: str, stderr: Any = subprocess.DEVNULL):
    env = {**_env(), "RELAY_REDIS_PREFIX": prefix}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--port", "0", *args,
        stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=ROOT)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)).decode()
        match = re.search(r"(ws://\S+/ws) .*\(pids ([\d, ]+)\)", line)
        assert match, line
        pids = [int(p) for p in match.group(2).split(", ")]
        metrics_url = None
        if "--metrics-port" in args:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            metrics_url = re.search(r"(http://\S+/metrics)", line).group(1)
        yield Supervised(proc, match.group(1), pids, metrics_url)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _connections(sup: Supervised) -> dict[str, float]:
    return _by_worker(await sup.metrics(), "relay_connections")


async def _connect_on_worker(sup: Supervised, wanted: set[str], stack) -> tuple[Client, str]:
    """A connection that landed on one of the ``wanted`` workers (the kernel spreads new
    connections; the supervisor's metrics tell where one landed)."""
    for _ in range(64):
        before = await _connections(sup)
        client_cm = Client.connect(sup.url)
        client = await client_cm.__aenter__()
        after = await _connections(sup)
        landed = [w for w in after if after[w] > before.get(w, 0)]
        assert len(landed) == 1, (before, after)
        if landed[0] in wanted:
            stack.push_async_exit(client_cm)
            return client, landed[0]
        await client_cm.__aexit__(None, None, None)
        async with asyncio.timeout(10):      # its worker has seen it go
            while (await _connections(sup)) != before:
                await asyncio.sleep(0.02)
    raise AssertionError(f"no connection landed on worker {wanted} in 64 tries")


async def test_two_workers_share_the_port_and_a_stream_moves_between_them(prefix):
    async with supervised("--workers", "2", "--redis", SHARED_REDIS, "--metrics-port", "0",
                          "--demo-tps", "20", "--detach-grace", "20", prefix=prefix) as sup:
        assert len(set(sup.pids)) == 2
        metrics = await sup.metrics()
        info = {dict(labels)["pid"] for (name, labels) in metrics
                if name == "relay_worker_info"}
        assert info == {str(pid) for pid in sup.pids}
        assert metrics[("relay_workers", ())] == 2

        async with contextlib.AsyncExitStack() as stack:
            a, worker_a = await _connect_on_worker(sup, {"0", "1"}, stack)
            await a.start("q1", messages=MESSAGES)
            started = await a.next_for("q1")
            assert started["type"] == "started", started
            before = [await a.next_for("q1") for _ in range(3)]
            assert [f["type"] for f in before] == ["token"] * 3
            # The other worker accepts too, and serves the stream the first one runs.
            other = {"0", "1"} - {worker_a}
            b, worker_b = await _connect_on_worker(sup, other, stack)
            a.ws.transport.abort()
            last = before[-1]["seq"]
            await b.send({"type": "resume", "stream_key": started["stream_key"],
                          "after_seq": last})
            assert (await b.next_for("q1"))["type"] == "resumed"
            frame = await b.next_for("q1")
            # (lossless: frames it could not send yet may arrive merged into one)
            assert frame["type"] == "token" and frame["seq"] > last, frame
            assert FULL_TEXT.startswith(text_of(before) + frame["text"]), frame
            await b.send({"type": "cancel", "id": "q1"})
            while frame["type"] != "finish":
                frame = await b.next_for("q1")
            assert frame["status"] == "cancelled", frame
            # The upstream call ran on worker A and was closed there by B's cancel.
            closed = _by_worker(await sup.metrics(), "relay_upstream_closed_on_cancel_total")
            assert closed[worker_a] == 1 and closed[worker_b] == 0, closed

        sup.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(sup.proc.wait(), 90) == 0
        assert not [pid for pid in sup.pids if _alive(pid)], "workers outlived SIGTERM"


async def test_a_dead_worker_is_restarted_and_workers_die_with_the_supervisor(prefix):
    async with supervised("--workers", "2", "--redis", SHARED_REDIS, "--metrics-port", "0",
                          prefix=prefix) as sup:
        victim = sup.pids[0]
        os.kill(victim, signal.SIGKILL)

        async def restarted() -> bool:
            samples = await sup.metrics()
            pids = {dict(labels)["pid"] for (name, labels) in samples
                    if name == "relay_worker_info"}
            return len(pids) == 2 and str(victim) not in pids

        async with asyncio.timeout(START_TIMEOUT):
            while not await restarted():
                await asyncio.sleep(0.2)
        samples = await sup.metrics()
        assert samples[("relay_worker_restarts_total", ())] == 1
        pids = [int(dict(labels)["pid"]) for (name, labels) in samples
                if name == "relay_worker_info"]
        # The supervisor dies without a chance to stop them: the kernel tells them.
        sup.proc.kill()
        await sup.proc.wait()
        await eventually(lambda: not any(_alive(pid) for pid in pids), timeout=60)


async def test_workers_of_a_killed_supervisor_drain_into_redis_as_on_sigterm(prefix, tmp_path):
    """``kill -9`` of the supervisor: the kernel's SIGTERM makes each worker drain as a
    relay does on SIGTERM with Redis (close 1012, finish the upstream call into Redis, where
    another relay resumes it), without failing on the dead supervisor's stdout pipe."""
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "wb") as stderr:
        async with supervised("--workers", "2", "--redis", SHARED_REDIS, "--demo-tps", "20",
                              "--detach-grace", "20", "--drain-timeout", "60",
                              prefix=prefix, stderr=stderr) as sup:
            async with Client.connect(sup.url) as client:
                await client.start("q1", messages=MESSAGES)
                started = await client.next_for("q1")
                assert started["type"] == "started", started
                before = [await client.next_for("q1") for _ in range(3)]
                assert [f["type"] for f in before] == ["token"] * 3
                sup.proc.kill()
                await sup.proc.wait()
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        before.append(await client.next_for("q1"))
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012, \
                    closed.value
            assert before[-1]["type"] == "token", before[-1]   # no finish before the 1012
            async with start_relay(redis_url=SHARED_REDIS, redis_prefix=prefix) as other:
                async with Client.connect(other.url) as resumer:
                    await resumer.send({"type": "resume", "stream_key": started["stream_key"],
                                        "after_seq": before[-1]["seq"]})
                    assert (await resumer.next_for("q1"))["type"] == "resumed"
                    after = await resumer.collect("q1")
            await eventually(lambda: not any(_alive(pid) for pid in sup.pids), timeout=90)
    # The stream ran to its end in the orphaned worker, not cancelled by the shutdown.
    assert (after[-1]["type"], after[-1]["status"]) == ("finish", "completed"), after[-1]
    assert text_of(before + after) == FULL_TEXT
    logged = stderr_path.read_text()
    assert "Traceback" not in logged and "BrokenPipeError" not in logged, logged
    assert logged.count("is gone; draining as on SIGTERM") == 2, logged
    assert logged.count("llm-relay draining (up to 60 s), then closing") == 2, logged


def test_more_than_one_worker_without_redis_is_refused():
    for value in ("2", "auto"):
        if value == "auto" and len(os.sched_getaffinity(0)) < 2:
            continue
        out = subprocess.run([sys.executable, "-m", "relay", "serve", "--workers", value],
                             capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
        assert out.returncode == 2, out
        assert f"--workers {value} needs --redis" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    for value in ("0", "many"):
        out = subprocess.run([sys.executable, "-m", "relay", "serve", "--workers", value],
                             capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
        assert out.returncode == 2 and "--workers must be" in out.stderr, out


def test_a_worker_that_cannot_start_stops_the_start_with_its_exit_code():
    from .test_cli import socket_port_with_nothing_listening

    url = f"redis://127.0.0.1:{socket_port_with_nothing_listening()}/0"
    out = subprocess.run([sys.executable, "-m", "relay", "serve", "--port", "0", "--workers",
                          "2", "--redis", url], capture_output=True, text=True, env=_env(),
                         cwd=ROOT, timeout=300)
    assert out.returncode == 2, out
    assert "cannot use Redis" in out.stderr, out.stderr
    assert "listening on" not in out.stdout


class _FakeWorkersSupervisor:
    """A ``Supervisor`` whose workers are futures, not processes (its start-up logic alone):
    ``_spawn`` gives each worker a ``ready`` future and calls ``on_spawn``; ``_stop_all``
    only records that it ran."""

    @staticmethod
    def make(on_spawn):
        from relay.config import RelaySettings
        from relay.runtime.workers import Supervisor

        class Fake(Supervisor):
            stopped = False

            async def _spawn(self, worker):
                worker.ready = asyncio.get_running_loop().create_future()
                on_spawn(self, worker)

            async def _stop_all(self):
                self.stopped = True
                return 0

        return Fake(RelaySettings(host="127.0.0.1", port=0), 2)


async def test_a_start_failure_leaves_no_wait_of_the_supervisor_pending():
    """A worker failing at start ends run() with its code; the futures run() waited on
    (start-up, SIGTERM, fatal) are all done by then, none left cancelled-but-pending."""
    def fail_at_once(supervisor, worker):
        supervisor._failed_start = 3
        supervisor._fatal.set()

    supervisor = _FakeWorkersSupervisor.make(fail_at_once)
    before = asyncio.all_tasks()
    assert await supervisor.run() == 3          # (no turn of the loop after it returned)
    assert supervisor.stopped
    left = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert not left, left


async def test_cancelling_the_supervisor_while_it_abandons_the_start_propagates():
    """run() cancelled while it waits for the abandoned start-up to end (it used to
    ``suppress(BaseException)`` around that wait) ends cancelled instead of carrying on
    and returning an exit code."""
    run: asyncio.Task | None = None

    def cancel_run_when_abandoned(supervisor, worker):
        if worker.index == 0:
            supervisor._failed_start = 3
            supervisor._fatal.set()
            # Runs when run() cancels the start-up, i.e. while run() awaits its end.
            worker.ready.add_done_callback(lambda _: run.cancel())

    supervisor = _FakeWorkersSupervisor.make(cancel_run_when_abandoned)
    run = asyncio.create_task(supervisor.run())
    with pytest.raises(asyncio.CancelledError):
        await run
    assert run.cancelled() and not supervisor.stopped
