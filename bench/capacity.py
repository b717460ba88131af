"""The capacity benchmark: every way of relaying one OpenAI-format upstream, side by side in
one run, on this machine.

    python bench/capacity.py              # full run (several minutes)
    python bench/capacity.py --quick      # fewer tokens and streams, 2 repetitions
    python bench/capacity.py --markdown   # also print the README "Performance" section

It starts a fake OpenAI-format upstream (bench/fake_upstream.py, a process of its own) and,
one at a time, each *path* as a process of its own, then drives it from this process:

  raw       the upstream's SSE read with httpx (on the relay's own transport,
            relay/upstream/transport.py, when the build has one) and parsed (orjson), no
            relaying: the floor
            (the same streams of the same length, 10 rounds one after another per
            measurement, so its CPU spans enough of /proc's 10 ms ticks; each stream's own
            cost (request, response headers) is spread over as many tokens as in the paths)
  fast      ``relay serve``, alias on the relay's direct SSE path (when this build has one:
            the config key ``fast``; an alias selects it unless ``fast = false``)
  fast-asyncio  the same with ``--loop asyncio`` (asyncio's own event loop instead of the
            default uvloop, on builds that have ``--loop``): what the loop is worth
  responses the ``fast`` relay's ``/v1/responses`` (the OpenAI Responses WebSocket mode:
            ``response.create`` in, Responses events out), throughput only: what the
            dialect's encoding costs over v1 on the same fast path
  litellm   ``relay serve``, alias with ``fast = false`` (on builds without a fast path:
            every alias, which is this path)
  naive     bench/naive_relay.py: the seed's EventStreamer (litellm stream -> one JSON frame
            per chunk) behind a plain websockets server
  proxy     LiteLLM's own proxy (``litellm --config``), SSE out: only when installed, in a
            venv of its own (bench/proxy-requirements.txt says how; ``--proxy-litellm``
            names its ``litellm`` command, default ``.venv-proxy/bin/litellm``), else a note
  workers   ``relay serve --workers 2 --redis`` next to ``--workers 1 --redis`` (needs Redis
            on 127.0.0.1:6379): what a second core adds

Measured (min / median / max over the repetitions):

* CPU us per token of the serving process only (its threads' run time from /proc schedstat,
  children included for the supervisor of workers) and tokens/s, with 1, 10 and 100
  concurrent streams from an unpaced upstream (each connection runs one stream after another
  until the measurement lasted MIN_MEASURED_SECONDS);
* relay-added latency p50/p99 with 100 and 1,000 streams paced at 10 tokens/s each (and
  1,000 with ``--workers 1``/``2 --redis``): the upstream writes ``time.monotonic()`` into
  each chunk's text, the client (bench/lean_ws.py) subtracts it from the time its socket
  read returned (one clock: CLOCK_MONOTONIC is system-wide); a stream that does not end with
  exactly one ``completed`` finish after all its tokens is counted lost;
* cancel -> upstream connection closed, p50/p99, at 100 concurrent streams (client's time
  of sending ``cancel`` vs the upstream's time of seeing its connection closed);
* idle memory per connection (RSS growth with N connections that said ``hello``).

Absolute figures are this machine's (shared, 2 cores: the clients and the upstream run on
the same cores as the path measured); compare the rows of one run. The benchmark's own
clients (this process) and the raw reader run on uvloop when it is installed, like ``relay
serve``: the clients stand in for other machines, and the less of the 2 cores they take, the
more the measured path gets. The fake upstream stays on asyncio's loop: on uvloop it left some
paced responses without their end (with the relay on either loop; bench-only code, not
investigated further). The naive relay keeps asyncio's loop, as the seed's code does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
PY = sys.executable
KEY_ENV = "BENCH_UPSTREAM_KEY"
PROXY_MASTER_KEY = "sk-bench-proxy-" + "0123456789abcdef" * 2   # loopback only
REDIS = "redis://127.0.0.1:6379/0"
TPS = 10.0                      # paced streams: tokens per second each
RAW_SCALE = 10                  # the raw path runs this many rounds per measurement
# A relay's measurement keeps each connection streaming (same length, one stream after
# another) until it lasted this long: a cheap path's single stream of 2,000 tokens takes
# ~10 ms, below what /proc's CPU figures resolve (a thread that exited counts in 10 ms ticks).
MIN_MEASURED_SECONDS = 1.0
MAX_STREAMS_PER_CONNECTION = 50
CANCEL_TPS = 2.0                # streams of the cancel test
CANCEL_WAIT = 5.0               # an upstream not closed this long after cancel: "not closed"

TARGETS = {
    "fast_vs_raw": "fast path CPU/token <= 2x the raw SSE read",
    "fast_vs_litellm": "fast path tokens/s per core >= 8x the LiteLLM path",
    "latency": "1,000 streams x 10 tok/s: relay-added p50 <= 10 ms, p99 <= 100 ms, none lost",
    "cancel": "cancel -> upstream closed p99 <= 20 ms at 100 streams",
    "workers": "2 workers >= 1.5x the tokens/s of 1 worker (where cores allow)",
    "idle": "idle connection <= 30 KiB",
    "responses": "/v1/responses CPU/token <= 1.3x v1 on the fast path",
}

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ processes

def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants: the sum of their live threads' run time
    from /proc/*/task/*/schedstat (nanoseconds; /proc's utime+stime count 10 ms ticks, too
    coarse for a 50 ms round), plus what threads that already exited ran: the process's
    utime+stime minus its live threads' (in ticks; a thread pool's worker that exits
    between two readings would otherwise make a round's CPU negative)."""
    total = 0.0
    for p in _tree(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
            process_ticks = _stat_ticks(f"/proc/{p}/stat")
        except (OSError, ValueError, IndexError):
            continue
        live_ticks = 0
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0]) / 1e9
                live_ticks += _stat_ticks(f"/proc/{p}/task/{t}/stat")
            except (OSError, ValueError, IndexError):
                pass
        total += max(0, process_ticks - live_ticks) / _CLK_TCK
    return total


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_ticks(path: str) -> int:
    """utime + stime (clock ticks) of a /proc/.../stat file."""
    with open(path) as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Proc:
    """A child process whose first stdout line matching ``ready`` says it is up; the rest of
    its output is drained (never left to fill a pipe)."""

    def __init__(self, name: str, args: list[str], ready: str, env: dict | None = None,
                 timeout: float = 300.0, stdin: bool = False,
                 merge_stderr: bool = False) -> None:
        self.name = name
        # merge_stderr: for servers that log their ready line on stderr (uvicorn).
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, **(env or {})}, stdin=subprocess.PIPE if stdin else None)
        self.errors: list[str] = []
        if not merge_stderr:
            threading.Thread(target=self._drain_err, daemon=True).start()
        deadline = time.monotonic() + timeout
        self.line = ""
        while time.monotonic() < deadline:
            line = self.popen.stdout.readline()
            if merge_stderr:
                self.errors.append(line)
                del self.errors[:-50]
            if not line:
                raise RuntimeError(f"{name} exited: {''.join(self.errors)[-2000:]}")
            if ready in line:
                self.line = line.strip()
                break
        else:
            raise RuntimeError(f"{name} not ready in {timeout} s")
        if not stdin:
            threading.Thread(target=self._drain_out, daemon=True).start()

    def _drain_out(self) -> None:
        for _ in self.popen.stdout:
            pass

    def _drain_err(self) -> None:
        for line in self.popen.stderr:
            self.errors.append(line)
            del self.errors[:-50]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _port_of(line: str) -> int:
    return int(line.split()[-1])


# ------------------------------------------------------------------------ clients

def _prompt(tokens: int, *, interval: float = 0.0, stamp: bool = False, tag: str = "") -> str:
    return f"bench tokens={tokens} interval={interval} stamp={int(stamp)} tag={tag}"


async def open_ws(url: str, count: int) -> list:
    from websockets.asyncio.client import connect

    gate = asyncio.Semaphore(50)

    async def one():
        async with gate:
            ws = await connect(url, subprotocols=["llm-relay.v1"], max_size=None,
                               compression=None, open_timeout=60, ping_interval=None)
            await ws.send('{"type":"hello"}')
            await ws.recv()
            return ws

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def open_responses(url: str, count: int) -> list:
    """``count`` connections to ``/v1/responses`` (no subprotocol, no hello)."""
    from websockets.asyncio.client import connect

    gate = asyncio.Semaphore(50)

    async def one():
        async with gate:
            return await connect(url, max_size=None, compression=None, open_timeout=60,
                                 ping_interval=None)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def responses_unpaced(ws, model: str, tokens: int) -> int:
    """One response of ``tokens`` tokens through ``/v1/responses``; the tokens received
    (counted in ``output_text.delta`` events only: the done events repeat the text)."""
    await ws.send(json.dumps({"type": "response.create", "model": model,
                              "input": _prompt(tokens)}))
    got = 0
    while True:
        data = await ws.recv(decode=False)
        if b'"response.output_text.delta"' in data:
            got += data.count(b"~")
        elif b'"response.completed"' in data:
            return got
        elif b'"type":"error"' in data or b'"response.failed"' in data \
                or b'"response.incomplete"' in data:
            raise RuntimeError(data[:300])


async def close_ws(conns: list) -> None:
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)


async def ws_unpaced(ws, sid: str, model: str, tokens: int) -> int:
    """Run one stream of ``tokens`` tokens; return the tokens received."""
    await ws.send(json.dumps({"type": "start", "id": sid, "model": model, "messages": [
        {"role": "user", "content": _prompt(tokens)}]}))
    got = 0
    while True:
        data = await ws.recv(decode=False)
        got += data.count(b"~")
        if b'"type":"finish"' in data or b'"type": "finish"' in data:
            frame = json.loads(data)
            if frame.get("status") != "completed":
                raise RuntimeError(f"stream ended {frame}")
            return got
        if b'"type":"error"' in data:
            raise RuntimeError(data[:300])


async def ws_paced(ws, sid: str, model: str, tokens: int, delay: float, deadline: float,
                   latencies: list[float]) -> int:
    """A paced stream with timestamps; returns tokens received by ``deadline``."""
    import orjson

    await asyncio.sleep(delay)                     # spread the streams' phases
    await ws.send(json.dumps({"type": "start", "id": sid, "model": model, "messages": [
        {"role": "user", "content": _prompt(tokens, interval=1 / TPS, stamp=True)}]}))
    got = 0
    clock = time.monotonic
    while True:
        left = deadline - clock()
        if left <= 0:
            return got
        try:
            data = await asyncio.wait_for(ws.recv(decode=False), left)
        except TimeoutError:
            return got
        now = clock()
        frame = orjson.loads(data)
        kind = frame.get("type")
        if kind == "token":
            for stamp in frame["text"].split("|")[:-1]:
                latencies.append(now - float(stamp))
                got += 1
        elif kind == "finish":
            return got
        elif kind == "error":
            raise RuntimeError(frame)


# ------------------------------------------------------------------------ paths

@dataclass
class Served:
    """One way of serving the upstream's tokens."""

    name: str
    label: str
    proc: Proc
    url: str = ""
    model: str = ""
    kind: str = "ws"          # ws | reader | sse

    async def throughput(self, streams: int, tokens: int) -> tuple[float, float]:
        """(CPU us per token of the serving process, tokens/s)."""
        if self.kind == "reader":
            return await self._reader_round(streams, tokens)
        if self.kind == "sse":
            return await self._sse_round(streams, tokens)
        responses = self.kind == "responses"
        conns = await (open_responses if responses else open_ws)(self.url, streams)

        async def one_connection(i: int, ws) -> tuple[int, int]:
            # Stream after stream, with no barrier between the connections: the load stays
            # at ``streams`` concurrent streams however the work is spread (over workers).
            runs = got = 0
            while runs == 0 or (runs < MAX_STREAMS_PER_CONNECTION
                                and time.perf_counter() - t0 < MIN_MEASURED_SECONDS):
                if responses:
                    got += await responses_unpaced(ws, self.model, tokens)
                else:
                    got += await ws_unpaced(ws, f"s{i}-{runs}", self.model, tokens)
                runs += 1
            return runs, got

        try:
            cpu0, t0 = tree_cpu(self.proc.pid), time.perf_counter()
            done = await asyncio.gather(*(one_connection(i, ws) for i, ws in enumerate(conns)))
            wall, cpu = time.perf_counter() - t0, tree_cpu(self.proc.pid) - cpu0
        finally:
            await close_ws(conns)
        runs = sum(r for r, _ in done)
        total = sum(g for _, g in done)
        if total != runs * tokens:
            raise RuntimeError(f"{self.name}: {total} of {runs * tokens} tokens arrived")
        return cpu / total * 1e6, total / wall

    async def _reader_round(self, streams: int, tokens: int) -> tuple[float, float]:
        # RAW_SCALE rounds of the same shape: the raw read is so cheap that one round would
        # last a few of /proc's 10 ms CPU ticks. (Not 10x longer streams: that would spread
        # each stream's fixed cost over 10x the tokens the paths get.)
        p = self.proc.popen
        cpu0, t0 = tree_cpu(self.proc.pid), time.perf_counter()
        p.stdin.write(f"{streams} {tokens} {RAW_SCALE}\n")
        p.stdin.flush()
        line = await asyncio.to_thread(p.stdout.readline)
        wall, cpu = time.perf_counter() - t0, tree_cpu(self.proc.pid) - cpu0
        total = int(line.split()[1])
        if total != streams * tokens * RAW_SCALE:
            raise RuntimeError(f"raw reader: {total} of {streams * tokens * RAW_SCALE} tokens")
        return cpu / total * 1e6, total / wall

    async def _sse_round(self, streams: int, tokens: int) -> tuple[float, float]:
        import httpx

        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(
                max_connections=streams + 10)) as client:
            async def one() -> int:
                got = 0
                body = {"model": self.model, "stream": True, "messages": [
                    {"role": "user", "content": _prompt(tokens)}]}
                async with client.stream("POST", self.url, json=body,
                                         headers={"Authorization": f"Bearer {PROXY_MASTER_KEY}"}) as r:
                    async for chunk in r.aiter_bytes():
                        got += chunk.count(b"~")
                return got

            cpu0, t0 = tree_cpu(self.proc.pid), time.perf_counter()
            got = await asyncio.gather(*(one() for _ in range(streams)))
            wall, cpu = time.perf_counter() - t0, tree_cpu(self.proc.pid) - cpu0
        total = sum(got)
        if total != streams * tokens:
            raise RuntimeError(f"{self.name}: {total} of {streams * tokens} tokens arrived")
        return cpu / total * 1e6, total / wall

    async def latency(self, streams: int, seconds: float) -> dict:
        """Relay-added latency of ``streams`` streams paced at TPS for ``seconds``, read by
        the lean client (bench/lean_ws.py). Every stream must end with exactly one
        ``finish`` (completed) after all its tokens: any other end is a lost stream."""
        import lean_ws

        tokens = max(1, int(seconds * TPS))
        latencies: list[float] = []
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(50)
        views: list = []

        async def one(i: int):
            view = lean_ws.PacedStream(latencies)
            async with gate:
                conn = await lean_ws.connect(self.url, view.on_message)
                conn.send_text('{"type":"hello"}')
                await asyncio.wait_for(view.welcome, 60)
            views.append(view)
            return conn, view

        pairs = await asyncio.gather(*(one(i) for i in range(streams)))
        conns = [c for c, _ in pairs]
        cpu0 = tree_cpu(self.proc.pid)
        try:
            start = loop.time()
            for i, (conn, view) in enumerate(pairs):
                # spread the streams' phases over one pacing interval
                loop.call_at(start + i / streams / TPS, conn.send_text, orjson_dumps(
                    {"type": "start", "id": f"p{i}", "model": self.model, "messages": [
                        {"role": "user", "content": _prompt(tokens, interval=1 / TPS,
                                                            stamp=True)}]}))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(v.done for _, v in pairs)),
                                       seconds * 2 + 20)
            cpu = tree_cpu(self.proc.pid) - cpu0
            await asyncio.sleep(0.5)         # a second finish, if any, would arrive now
        finally:
            for conn in conns:
                conn.close()
        first = min((sent for sent, _ in latencies), default=0.0)
        by_second: dict[int, list[float]] = {}
        for sent, lat in latencies:
            by_second.setdefault(int(sent - first), []).append(lat)
        log("p50/p99 ms by second of the run: " + ", ".join(
            f"{_pct(sorted(v), 50) * 1000:.0f}/{_pct(sorted(v), 99) * 1000:.0f}"
            for _, v in sorted(by_second.items())))
        latencies = sorted(lat for _, lat in latencies)
        got = sum(v.tokens for _, v in pairs)
        bad = [(i, v, c) for i, (c, v) in enumerate(pairs)
               if v.finishes != 1 or v.tokens != tokens or v.errors
               or not (v.status or "").startswith("completed/")]
        for i, v, c in bad[:5]:
            log(f"stream p{i} lost: {v.tokens}/{tokens} tokens, {v.finishes} finish(es) "
                f"({v.status}), errors {v.errors[:1]}, close code {c.close_code}")
        return {"p50": _pct(latencies, 50), "p99": _pct(latencies, 99),
                "lost": streams * tokens - got, "expected": streams * tokens,
                "streams_lost": len(bad), "frames": sum(v.frames for _, v in pairs),
                "cpu_us": cpu / got * 1e6 if got else None}

    async def cancel(self, streams: int, upstream_port: int, run: int) -> dict:
        """Cancel ``streams`` running streams one by one (10 ms apart); upstream closes vs
        cancel send times. The streams are paced at CANCEL_TPS, a load every path carries,
        so this measures the cancel, not a backlog."""
        import orjson

        conns = await open_ws(self.url, streams)
        sent: dict[str, float] = {}
        try:
            tags = [f"c{run}-{i}" for i in range(streams)]
            for ws, tag in zip(conns, tags):
                await ws.send(json.dumps({"type": "start", "id": tag, "model": self.model,
                                          "messages": [{"role": "user", "content": _prompt(
                                              100_000, interval=1 / CANCEL_TPS,
                                              stamp=True, tag=tag)}]}))

            async def first_token(ws):
                while orjson.loads(await ws.recv(decode=False)).get("type") != "token":
                    pass

            await asyncio.wait_for(asyncio.gather(*(first_token(ws) for ws in conns)), 120)
            order = list(zip(conns, tags))
            random.Random(run).shuffle(order)
            for ws, tag in order:
                sent[tag] = time.monotonic()
                await ws.send(json.dumps({"type": "cancel", "id": tag}))
                await asyncio.sleep(0.01)              # spacing of the cancels

            async def finished(ws):
                while orjson.loads(await ws.recv(decode=False)).get("type") != "finish":
                    pass

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(finished(ws) for ws in conns)), 10)
            # Late upstream closes are measured too, up to CANCEL_WAIT after the cancel.
            while True:
                closed = (await _get_json(upstream_port, "/stats"))["closed"]
                if all(tag in closed for tag in sent) or \
                        time.monotonic() > max(sent.values()) + CANCEL_WAIT:
                    break
                await asyncio.sleep(0.2)
        finally:
            await close_ws(conns)
        delays = sorted(closed[tag] - at for tag, at in sent.items() if tag in closed
                        and closed[tag] - at < CANCEL_WAIT)
        return {"p50": _pct(delays, 50), "p99": _pct(delays, 99),
                "not_closed": len(sent) - len(delays)}

    async def idle_memory(self, count: int) -> float:
        """Bytes of resident memory per idle connection (after hello)."""
        await asyncio.sleep(0.5)
        before = tree_rss(self.proc.pid)
        conns = await open_ws(self.url, count)
        try:
            await asyncio.sleep(1.0)                    # let the server settle
            after = tree_rss(self.proc.pid)
        finally:
            await close_ws(conns)
        return (after - before) / count


def orjson_dumps(value) -> bytes:
    import orjson

    return orjson.dumps(value)


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(len(values) * p / 100))]


async def _get_json(port: int, path: str) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length")][0])
    body = await reader.readexactly(length)
    writer.close()
    return json.loads(body)


# ------------------------------------------------------------------------ raw reader

async def raw_reader(base: str) -> None:
    """The ``raw`` path's process: reads "STREAMS TOKENS ROUNDS" lines, runs ROUNDS rounds of
    that many concurrent SSE reads with httpx (lines -> orjson -> delta content), prints
    "done TOKENS"."""
    import httpx
    import orjson

    sys.path.insert(0, str(ROOT))
    # The HTTP transport the relay's fast path reads with, so the two differ by what the
    # relay does with the tokens, not by how the bytes are read.
    try:
        from relay.upstream.transport import AiohttpTransport as FastPathTransport
    except ImportError:
        try:                            # builds before the aiohttp wire
            from relay.upstream.transport import ShardedTransport as FastPathTransport
        except ImportError:             # a build without either: httpx's default transport
            FastPathTransport = None
    transport = FastPathTransport() if FastPathTransport is not None else None
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=2000),
                                 transport=transport) as c:
        async def one(tokens: int) -> int:
            got = 0
            body = {"model": "bench-model", "stream": True, "messages": [
                {"role": "user", "content": _prompt(tokens)}]}
            async with c.stream("POST", f"{base}/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        choices = orjson.loads(line[6:])["choices"]
                        if choices and choices[0]["delta"].get("content"):
                            got += 1
            return got

        print("raw-reader ready", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            streams, tokens, rounds = map(int, line.split())
            total = 0
            for _ in range(rounds):
                total += sum(await asyncio.gather(*(one(tokens) for _ in range(streams))))
            print(f"done {total}", flush=True)


# ------------------------------------------------------------------------ the run

@dataclass
class Results:
    throughput: dict = field(default_factory=dict)   # (path, streams) -> [(cpu, tps)]
    latency: dict = field(default_factory=dict)      # (path, streams) -> [dict]
    cancel: dict = field(default_factory=dict)       # path -> [dict]
    idle: dict = field(default_factory=dict)         # path -> [bytes per connection]
    notes: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    cores: dict = field(default_factory=dict)        # path -> [CoreShare] (workers rounds)


@dataclass
class CoreShare:
    """Cores in use during one measurement (CPU seconds per wall second): the whole machine
    (/proc/stat), the relay (its process tree), this process (the clients) and the upstream."""

    machine: float
    relay: float
    clients: float
    upstream: float


def _machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)      # idle + iowait
    return sum(values) - idle, sum(values)


async def measure_cores(coro, relay_pid: int, upstream_pid: int):
    """Await ``coro``; return (its result, the ``CoreShare`` of that time)."""
    busy0, total0 = _machine_busy()
    relay0, clients0, up0 = tree_cpu(relay_pid), time.process_time(), tree_cpu(upstream_pid)
    t0 = time.perf_counter()
    result = await coro
    wall = time.perf_counter() - t0
    busy1, total1 = _machine_busy()
    share = CoreShare(
        machine=(busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1),
        relay=(tree_cpu(relay_pid) - relay0) / wall,
        clients=(time.process_time() - clients0) / wall,
        upstream=(tree_cpu(upstream_pid) - up0) / wall)
    return result, share


def _config(upstream: int, with_fast_key: bool) -> str:
    base = f"http://127.0.0.1:{upstream}/v1"
    text = (f'[models.bench]\nmodel = "openai/bench-model"\napi_base = "{base}"\n'
            f'api_key_env = "{KEY_ENV}"\n')
    if with_fast_key:
        text += (f'\n[models.bench-litellm]\nmodel = "openai/bench-model"\napi_base = '
                 f'"{base}"\napi_key_env = "{KEY_ENV}"\nfast = false\n')
    return text


RELAY_FLAGS = ["--log-level", "warning", "--max-connections", "100000",
               "--max-connections-per-principal", "100000",
               "--max-streams-per-principal", "100000", "--start-rate-per-minute", "1e9",
               "--start-burst", "1000000",
               # every benchmark client connects from 127.0.0.1, all at once
               "--max-pending-per-address", "100000", "--max-pending-connections", "100000"]


def start_relay(config: Path, *extra: str) -> Proc:
    return Proc("relay", [PY, "-m", "relay", "serve", "--port", "0", "--config", str(config),
                          *RELAY_FLAGS, *extra], "listening on", env={KEY_ENV: "sk-bench"})


def _relay_url(proc: Proc) -> str:
    return proc.line.split("listening on ")[1].split()[0]


def _proxy_command(choice: str) -> str | None:
    """The ``litellm`` command of an installed LiteLLM proxy, or None when there is none."""
    command = shutil.which(choice) or (choice if Path(choice).is_file() else None)
    if command is None:
        return None
    python = Path(command).with_name("python")       # the venv's interpreter runs the check
    check = [str(python) if python.exists() else PY, "-c",
             "import fastapi, uvicorn, litellm.proxy.proxy_server"]
    ok = subprocess.run(check, capture_output=True, cwd=ROOT, env={
        **os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}).returncode == 0
    return command if ok else None


async def run(args: argparse.Namespace) -> Results:
    res = Results()
    quick = args.quick
    reps = args.reps or (2 if quick else 3)
    shapes = [(1, 300), (10, 60), (100, 40)] if quick else [(1, 2000), (10, 400), (100, 100)]
    latency_runs = [(100, 4.0), (1000, 4.0)] if quick else [(100, 10.0), (1000, 10.0)]
    idle_count = 300 if quick else 1000
    modes = args.modes.split(",")
    res.labels.update(reps=reps, shapes=shapes, latency_runs=latency_runs,
                      idle_count=idle_count)

    tmp = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    upstream = Proc("upstream", [PY, str(BENCH / "fake_upstream.py")], "fake-upstream")
    up_port = _port_of(upstream.line)
    base = f"http://127.0.0.1:{up_port}/v1"
    procs: list[Proc] = [upstream]
    paths: list[Served] = []
    try:
        # Does this build have the fast path (the per-alias ``fast`` key)?
        config = tmp / "relay.toml"
        config.write_text(_config(up_port, with_fast_key=True))
        has_fast = True
        relay = None
        if {"fast", "litellm"} & set(modes):
            try:
                relay = start_relay(config)
            except RuntimeError as exc:
                if "fast" not in str(exc):
                    raise
                has_fast = False
                config.write_text(_config(up_port, with_fast_key=False))
                relay = start_relay(config)
                res.notes.append("this build has no fast path (config key `fast` unknown): "
                                 "the relay row is its LiteLLM path")
            procs.append(relay)
            url = _relay_url(relay)
            if has_fast and "fast" in modes:
                paths.append(Served("fast", "llm-relay, fast path", relay, url, "bench"))
            if has_fast and "responses" in modes:
                paths.append(Served("responses", "llm-relay /v1/responses, fast path", relay,
                                    url.rsplit("/", 1)[0] + "/v1/responses", "bench",
                                    kind="responses"))
            if "litellm" in modes:
                paths.append(Served("litellm", "llm-relay, LiteLLM path" if has_fast else
                                   "llm-relay (LiteLLM path)", relay, url,
                                   "bench-litellm" if has_fast else "bench"))
        if "fast-asyncio" in modes and has_fast:
            try:
                plain = start_relay(config, "--loop", "asyncio")
            except RuntimeError as exc:           # a build without --loop
                res.notes.append(f"fast path on asyncio's loop: not measured ({exc})")
            else:
                procs.append(plain)
                paths.append(Served("fast-asyncio", "llm-relay, fast path, asyncio loop",
                                    plain, _relay_url(plain), "bench"))
        if "raw" in modes:
            reader = Proc("raw", [PY, str(Path(__file__)), "--raw-reader", base],
                          "raw-reader ready", stdin=True)
            procs.append(reader)
            paths.insert(0, Served("raw", "raw SSE read (httpx + orjson), no relay", reader,
                                  kind="reader"))
        if "naive" in modes:
            naive = Proc("naive", [PY, str(BENCH / "naive_relay.py"), "--config",
                                   str(config)], "naive-relay", env={KEY_ENV: "sk-bench"})
            procs.append(naive)
            paths.append(Served("naive", "seed-style naive relay", naive,
                               f"ws://127.0.0.1:{_port_of(naive.line)}", "bench"))
        if "proxy" in modes:
            proxy_cmd = _proxy_command(args.proxy_litellm)
            if proxy_cmd is not None:
                yaml = tmp / "proxy.yaml"
                yaml.write_text(
                    "model_list:\n  - model_name: bench\n    litellm_params:\n"
                    f"      model: openai/bench-model\n      api_base: {base}\n"
                    "      api_key: sk-bench\n")
                port = _free_port()
                # The proxy refuses a weak master key; clients send it as their bearer token.
                proxy = Proc("proxy", [proxy_cmd, "--config", str(yaml), "--port", str(port),
                                       "--num_workers", "1"], "Uvicorn running",
                             env={"LITELLM_MASTER_KEY": PROXY_MASTER_KEY,
                                  "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
                             merge_stderr=True)
                procs.append(proxy)
                paths.append(Served("proxy", "LiteLLM proxy (SSE out)", proxy,
                                   f"http://127.0.0.1:{port}/v1/chat/completions", "bench",
                                   kind="sse"))
            else:
                res.notes.append(f"LiteLLM proxy: not measured, no working `{args.proxy_litellm}` "
                                 "(install it as bench/proxy-requirements.txt says)")

        # Warm every path up (first requests import and connect), then measure.
        for path in paths:
            log(f"warming up {path.name}")
            await path.throughput(1, 20)

        if relay is not None and "idle" not in args.skip:
            for path in paths:
                if path.name in ("litellm", "naive") or (path.name == "fast"
                                                         and "litellm" not in modes):
                    log(f"idle memory: {path.name}, {idle_count} connections")
                    res.idle.setdefault(path.name, []).append(
                        await path.idle_memory(idle_count))

        for rep in range(reps if "throughput" not in args.skip else 0):
            for streams, tokens in shapes:
                for path in paths:
                    log(f"rep {rep + 1}/{reps}: {path.name}, {streams} x {tokens} tokens")
                    try:
                        res.throughput.setdefault((path.name, streams), []).append(
                            await path.throughput(streams, tokens))
                    except Exception as exc:
                        res.notes.append(f"{path.name} at {streams} streams failed: {exc}")

        ws_paths = [p for p in paths if p.kind == "ws"]
        if "latency" not in args.skip:
            for streams, seconds in latency_runs:
                if args.latency_streams and streams not in args.latency_streams:
                    continue
                for path in ws_paths:
                    # A path that cannot carry the load only shows its backlog growing.
                    needed = streams * TPS
                    best = max((tps for n in (1, 10, 100)
                                for _, tps in res.throughput.get((path.name, n), [])),
                               default=0)
                    if streams > 100 and best < needed * 0.5 and not args.always_latency \
                            and "throughput" not in args.skip:
                        res.notes.append(
                            f"{path.label}: latency at {streams} streams not run: it "
                            f"delivered at most {best:,.0f} tok/s unpaced, {needed:,.0f} "
                            "needed")
                        continue
                    for rep in range(reps):
                        log(f"latency rep {rep + 1}: {path.name}, {streams} streams x "
                            f"{TPS:g} tok/s for {seconds:g} s")
                        res.latency.setdefault((path.name, streams), []).append(
                            await path.latency(streams, seconds))
        if "cancel" not in args.skip:
            for path in ws_paths:
                for rep in range(reps):
                    log(f"cancel rep {rep + 1}: {path.name}, 100 streams")
                    res.cancel.setdefault(path.name, []).append(
                        await path.cancel(100, up_port, rep * 1000 + len(res.cancel)))

        for path in paths:
            res.labels[path.name] = path.label
        for proc in procs[1:]:
            proc.stop()
        procs = procs[:1]
        if "workers" in modes:
            await _workers(res, config, has_fast, shapes, reps, procs,
                           latency_runs[-1] if "latency" not in args.skip else None)
    finally:
        for proc in procs:
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    res.labels["has_fast"] = has_fast
    return res


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


async def _workers(res: Results, config: Path, has_fast: bool, shapes, reps,
                   procs: list[Proc], latency_run: tuple[int, float] | None) -> None:
    """Tokens/s at 100 streams with ``--workers 1`` and ``--workers 2`` (both ``--redis``,
    which workers need: the streams are mirrored to Redis in both), and the relay-added
    latency of ``latency_run`` (streams, seconds) paced streams."""
    if not _redis_up():
        res.notes.append("workers: not measured, no Redis on 127.0.0.1:6379")
        return
    streams, tokens = shapes[-1]
    for count in (1, 2):
        prefix = f"bench:{os.getpid()}:{count}:"
        proc = Proc("relay", [PY, "-m", "relay", "serve", "--port", "0", "--config",
                              str(config), *RELAY_FLAGS, "--redis", REDIS, "--workers",
                              str(count)], "listening on",
                    env={KEY_ENV: "sk-bench", "RELAY_REDIS_PREFIX": prefix})
        procs.append(proc)
        name = f"workers{count}"
        path = Served(name, f"llm-relay --workers {count} --redis", proc, _relay_url(proc),
                     "bench")
        res.labels[name] = path.label + (" (fast path)" if has_fast else " (LiteLLM path)")
        await path.throughput(streams, 20)
        for rep in range(reps):
            log(f"workers rep {rep + 1}: {count} worker(s), {streams} x {tokens} tokens")
            measured, share = await measure_cores(path.throughput(streams, tokens), proc.pid,
                                                  procs[0].pid)
            res.throughput.setdefault((name, streams), []).append(measured)
            res.cores.setdefault(name, []).append(share)
        if latency_run is not None:
            paced, seconds = latency_run
            for rep in range(reps):
                log(f"workers latency rep {rep + 1}: {count} worker(s), {paced} streams x "
                    f"{TPS:g} tok/s for {seconds:g} s")
                res.latency.setdefault((name, paced), []).append(
                    await path.latency(paced, seconds))
        proc.stop()
        procs.remove(proc)


# ------------------------------------------------------------------------ report

def _mmm(values: list[float], fmt: str = "{:,.0f}") -> str:
    if not values:
        return "n/a"
    values = sorted(values)
    return " / ".join(fmt.format(v) for v in (values[0], statistics.median(values),
                                               values[-1]))


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:,.1f}"


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def tables(res: Results) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    shapes = [n for n, _ in res.labels["shapes"]]
    names = [n for n in ("raw", "fast", "responses", "fast-asyncio", "litellm", "naive", "proxy")
             if n in res.labels]
    rows = []
    for name in names:
        row = [res.labels[name]]
        for n in shapes:
            row.append(_mmm([c for c, _ in res.throughput.get((name, n), [])]))
        for n in shapes:
            row.append(_mmm([t for _, t in res.throughput.get((name, n), [])]))
        rows.append(row)
    out.append(("Throughput, unpaced upstream (min / median / max)",
                ["path"] + [f"CPU us/token, {n} stream{'s' * (n > 1)}" for n in shapes]
                + [f"tokens/s, {n}" for n in shapes], rows))
    rows = []
    for name in names + ["workers1", "workers2"]:
        for streams, seconds in res.labels["latency_runs"]:
            runs = res.latency.get((name, streams))
            if not runs:
                continue
            rows.append([res.labels[name], f"{streams:,}",
                         _mmm([r["p50"] * 1000 for r in runs if r["p50"] is not None],
                              "{:,.1f}"),
                         _mmm([r["p99"] * 1000 for r in runs if r["p99"] is not None],
                              "{:,.1f}"),
                         " / ".join(f"{r['lost']:,}" for r in runs),
                         " / ".join(f"{r.get('streams_lost', 'n/a')}" for r in runs),
                         _mmm([r["cpu_us"] for r in runs if r.get("cpu_us") is not None])])
    if rows:
        out.append((f"Relay-added latency, streams paced at {TPS:g} tokens/s, ms (min / median"
                    " / max over repetitions)",
                    ["path", "streams", "p50", "p99", "tokens not delivered (per rep)",
                     "streams lost (per rep)", "serving CPU us/token"], rows))
    rows = []
    for name in names:
        runs = res.cancel.get(name)
        if runs:
            rows.append([res.labels[name],
                         _mmm([r["p50"] * 1000 for r in runs if r["p50"] is not None],
                              "{:,.1f}"),
                         _mmm([r["p99"] * 1000 for r in runs if r["p99"] is not None],
                              "{:,.1f}"),
                         " / ".join(str(r["not_closed"]) for r in runs)])
    if rows:
        out.append((f"Cancel -> upstream connection closed, 100 concurrent streams at "
                    f"{CANCEL_TPS:g} tokens/s, ms",
                    ["path", "p50", "p99", f"not closed within {CANCEL_WAIT:g} s (per rep)"], rows))
    rows = [[res.labels[name], _mmm([b / 1024 for b in res.idle[name]], "{:,.1f}")]
            for name in names if name in res.idle]
    if rows:
        out.append((f"Idle memory per connection (RSS growth over "
                    f"{res.labels['idle_count']:,} connections after hello), KiB",
                    ["path", "KiB per connection"], rows))
    rows = []
    for name in ("workers1", "workers2"):
        runs = res.throughput.get((name, shapes[-1]))
        if runs:
            shares = res.cores.get(name, [])
            rows.append([res.labels[name], _mmm([t for _, t in runs]),
                         _mmm([c for c, _ in runs])]
                        + [_mmm([getattr(c, part) for c in shares], "{:.2f}")
                           for part in ("machine", "relay", "clients", "upstream")])
    if rows:
        out.append((f"Workers, {shapes[-1]} streams, unpaced (CPU: supervisor and workers "
                    f"together; cores in use of the machine's {os.cpu_count()})",
                    ["relay", "tokens/s", "CPU us/token", "cores busy, machine",
                     "cores, relay", "cores, clients", "cores, upstream"], rows))
    out.append(("Targets (issue 11) and this run", ["target", "measured"], _targets(res)))
    return out


def _targets(res: Results) -> list[list[str]]:
    rows = []

    def cpu(name):
        return _median([c for n in (1, 10, 100) for c, _ in res.throughput.get((name, n), [])])

    raw, fast, lite, responses = cpu("raw"), cpu("fast"), cpu("litellm"), cpu("responses")
    rows.append([TARGETS["fast_vs_raw"],
                 f"fast/raw = {fast / raw:.1f}x" if fast and raw else "n/a (no fast path)"])
    rows.append([TARGETS["fast_vs_litellm"],
                 f"LiteLLM/fast CPU per token = {lite / fast:.1f}x" if fast and lite
                 else "n/a (no fast path)"])
    rows.append([TARGETS["responses"],
                 f"/v1/responses / v1 CPU per token = {responses / fast:.2f}x"
                 if fast and responses else "not run"])
    best = None
    for name in ("fast", "litellm"):
        runs = res.latency.get((name, 1000))
        if runs:
            best = (name, runs)
            break
    if best:
        name, runs = best
        rows.append([TARGETS["latency"],
                     f"{res.labels[name]}: p50 {_ms(_median([r['p50'] for r in runs]))} ms, "
                     f"p99 {_ms(_median([r['p99'] for r in runs]))} ms, not delivered "
                     f"{sum(r['lost'] for r in runs)} of {sum(r['expected'] for r in runs)} "
                     f"tokens, {sum(r.get('streams_lost', 0) for r in runs)} of "
                     f"{1000 * len(runs)} streams lost"])
    else:
        rows.append([TARGETS["latency"], "not run (see notes)"])
    runs = res.latency.get(("workers2", 1000))
    if runs:
        rows.append([TARGETS["latency"],
                     f"{res.labels['workers2']}: p50 {_ms(_median([r['p50'] for r in runs]))} "
                     f"ms, p99 {_ms(_median([r['p99'] for r in runs]))} ms, not delivered "
                     f"{sum(r['lost'] for r in runs)} of {sum(r['expected'] for r in runs)} "
                     f"tokens, {sum(r.get('streams_lost', 0) for r in runs)} of "
                     f"{1000 * len(runs)} streams lost"])
    for name in ("fast", "litellm"):
        runs = res.cancel.get(name)
        if runs:
            rows.append([TARGETS["cancel"],
                         f"{res.labels[name]}: p99 {_ms(_median([r['p99'] for r in runs]))} ms"])
    one = _median([t for _, t in res.throughput.get(("workers1", res.labels["shapes"][-1][0]),
                                                    [])])
    two = _median([t for _, t in res.throughput.get(("workers2", res.labels["shapes"][-1][0]),
                                                    [])])
    shares = res.cores.get("workers2", [])
    single = res.cores.get("workers1", [])
    busy = (f" (the machine's {os.cpu_count()} cores {_median([c.machine for c in shares]):.2f}"
            f" busy: relay {_median([c.relay for c in shares]):.2f}, clients "
            f"{_median([c.clients for c in shares]):.2f}, upstream "
            f"{_median([c.upstream for c in shares]):.2f}; the machine allowed 2 workers "
            f"{_median([c.relay for c in shares]) / _median([c.relay for c in single]):.2f}x "
            "the cores of 1)") if shares and single else ""
    rows.append([TARGETS["workers"], f"{two / one:.2f}x on {os.cpu_count()} cores shared with "
                 f"the clients and the upstream{busy}" if one and two else "not run"])
    idle = [_median(v) for k, v in res.idle.items() if k in ("fast", "litellm")]
    rows.append([TARGETS["idle"], f"{idle[0] / 1024:.1f} KiB" if idle else "not run"])
    return rows


def render(res: Results, markdown: bool) -> str:
    lines = []
    for title, header, rows in tables(res):
        if markdown:
            lines += [f"**{title}**", "", "| " + " | ".join(header) + " |",
                      "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
            lines += [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
            lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
        lines.append("")
    for note in res.notes:
        lines.append(f"- {note}" if markdown else f"note: {note}")
    return "\n".join(lines)


def machine() -> str:
    from importlib.metadata import version

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return (f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} "
            f"cores, {mem:.0f} GiB, load average {load:.1f} at the end, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"litellm {version('litellm')}, websockets {version('websockets')}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens, 2 repetitions")
    parser.add_argument("--reps", type=int, help="repetitions (3; --quick: 2)")
    parser.add_argument("--modes",
                        default="raw,fast,responses,fast-asyncio,litellm,naive,proxy,workers",
                        help="paths to measure (comma-separated)")
    parser.add_argument("--skip", default="",
                        help="parts to skip: throughput,latency,cancel,idle")
    parser.add_argument("--latency-streams", type=lambda v: [int(x) for x in v.split(",")],
                        help="only these latency runs (e.g. 1000)")
    parser.add_argument("--always-latency", action="store_true",
                        help="run the 1,000-stream latency test on paths too slow for it")
    parser.add_argument("--markdown", action="store_true",
                        help="also print the README performance section")
    parser.add_argument("--proxy-litellm", default=str(ROOT / ".venv-proxy" / "bin" / "litellm"),
                        metavar="COMMAND",
                        help="the LiteLLM proxy's `litellm` command (default: "
                             ".venv-proxy/bin/litellm; see bench/proxy-requirements.txt)")
    parser.add_argument("--raw-reader", metavar="BASE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_reader:
        await raw_reader(args.raw_reader)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    res = await run(args)
    about = machine()
    print(f"\nllm-relay capacity benchmark: {about}; {res.labels['reps']} repetitions; "
          f"took {time.monotonic() - started:.0f} s\n")
    print(render(res, markdown=False))
    if args.markdown:
        print("\n----- README section (markdown) -----\n")
        print(f"Measured by `python bench/capacity.py{' --quick' if args.quick else ''}` on "
              f"{about}; {res.labels['reps']} repetitions.\n")
        print(render(res, markdown=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_fastest_loop(main) -> None:
    """``asyncio.run(main)`` on uvloop when it is installed (see the module docstring)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


if __name__ == "__main__":
    run_on_fastest_loop(main())
