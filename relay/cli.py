"""``relay`` command line. ``relay serve --help`` must not import LiteLLM (it is slow), so
everything heavy is imported inside the command functions."""

from __future__ import annotations

import argparse
import asyncio
import os
import faulthandler
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    # (Types only: ``relay --help`` imports none of these.)
    from relay.config import RelaySettings
    from relay.runtime.server import RelayServer
    from relay.upstream.providers import ModelRegistry

__all__ = ["main"]

#: The ``relay`` subcommands (what ``add_subparsers`` returns; a private name of argparse's).
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="llm-relay: stream LLM tokens "
                                     "over WebSocket (protocol llm-relay.v1)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the relay server",
                           description="Run the relay. Every flag also reads RELAY_<NAME> "
                           "from the environment (flags win).")
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8765; 0 = any free port)")
    serve.add_argument("--metrics-port", type=int,
                       help="serve /metrics on this port only, not on --port (0 = any free)")
    serve.add_argument("--config", help="TOML file of model aliases (also RELAY_CONFIG)")
    serve.add_argument("--redis", dest="redis_url", metavar="URL",
                       help="redis://host:port/db: relays share streams (resume and cancel "
                            "across processes; SIGTERM closes 1012)")
    serve.add_argument("--redis-max-frames", type=int,
                       help="frames kept per stream in Redis (100000)")
    serve.add_argument("--detach-grace", type=float,
                       help="seconds a disconnected stream stays resumable (15; 0 = off)")
    serve.add_argument("--max-stream-log-bytes", type=int,
                       help="frames kept per stream for resume (8 MiB)")
    serve.add_argument("--max-log-bytes", type=int, help="all stream logs in total (256 MiB)")
    serve.add_argument("--max-viewers-per-stream", type=int,
                       help="resumes that watch one stream besides its owner (8)")
    serve.add_argument("--slow-consumer-bytes", type=int,
                       help="unsent backlog per connection tolerated (1 MiB)...")
    serve.add_argument("--slow-consumer-grace", type=float,
                       help="...for this many seconds, then close 4008 (10)")
    serve.add_argument("--send-buffer-bytes", type=int,
                       help="kernel send buffer per connection (default: the OS's)")
    serve.add_argument("--redis-owner-ttl", type=float,
                       help="seconds a relay's heartbeat records live in Redis: a killed "
                            "relay's streams are stream_lost elsewhere within this + 1 s (6)")
    serve.add_argument("--responses-chain-entries", type=int,
                       help="/v1/responses: stored responses per principal (256)")
    serve.add_argument("--responses-chain-bytes", type=int,
                       help="/v1/responses: stored conversation bytes per principal (32 MiB)")
    serve.add_argument("--responses-chain-total-bytes", type=int,
                       help="/v1/responses: stored conversation bytes in total (256 MiB)")
    serve.add_argument("--responses-chain-ttl", type=float,
                       help="/v1/responses: seconds a response stays continuable in Redis (3600)")
    serve.add_argument("--max-streams", type=int, help="concurrent streams per connection (8)")
    serve.add_argument("--max-frame-bytes", type=int, help="inbound frame limit (1048576)")
    serve.add_argument("--hello-timeout", type=float, help="seconds to wait for hello (10)")
    serve.add_argument("--demo-tps", type=float, help="demo model tokens/s, 0 = unthrottled (40)")
    serve.add_argument("--first-token-timeout", type=float, help="seconds (60)")
    serve.add_argument("--idle-timeout", type=float, help="seconds between chunks (30)")
    serve.add_argument("--total-timeout", type=float, help="seconds per stream (600)")
    serve.add_argument("--allow-origin", action="append", dest="allow_origins",
                       help="browser Origin allowed to connect (repeatable; '*' = any). "
                       "Default: only the relay's own origin; no Origin header = not a browser")
    serve.add_argument("--public-url", metavar="URL",
                       help="address browsers reach the relay at, e.g. https://relay.example; "
                       "its origin is the relay's own (default: the listen address; "
                       "0.0.0.0: only the loopback origins)")
    serve.add_argument("--trusted-proxy", action="append", dest="trusted_proxies",
                       help="peer address or CIDR whose X-Forwarded-For is honoured; the "
                       "client is the rightmost entry that is not a trusted proxy (repeatable)")
    serve.add_argument("--drain-timeout", type=float,
                       help="on SIGTERM, seconds running streams may finish (30); a "
                       "second SIGTERM/SIGINT (Ctrl-C) ends them at once")
    serve.add_argument("--max-connections", type=int, help="per server (10000)")
    serve.add_argument("--max-connections-per-principal", type=int, help="(100)")
    serve.add_argument("--max-pending-per-address", type=int,
                       help="connections without hello from one address (32)")
    serve.add_argument("--max-pending-connections", type=int,
                       help="connections without hello in total (a quarter of "
                       "--max-connections)")
    serve.add_argument("--max-streams-per-principal", type=int, help="(32)")
    serve.add_argument("--start-rate-per-minute", type=float,
                       help="per principal (default: none without --auth, 600 with it)")
    serve.add_argument("--start-burst", type=int,
                       help="(default: ten seconds' worth of the rate; 100 with --auth)")
    serve.add_argument("--frames-per-second", type=float, help="inbound per connection (100)")
    serve.add_argument("--frame-burst", type=int, help="(200)")
    serve.add_argument("--replay-events-per-second", type=float,
                       help="events a principal's resumes may replay per second, across its "
                       "connections (2000; 0 = no limit)")
    serve.add_argument("--replay-event-burst", type=int, help="(100000)")
    serve.add_argument("--max-messages-bytes", type=int, help="start.messages+tools (524288)")
    serve.add_argument("--max-messages", type=int, help="messages in one start (2000)")
    serve.add_argument("--max-tools", type=int, help="tools in one start (128)")
    serve.add_argument("--max-content-parts", type=int,
                       help="content parts of one start's messages, together (4000)")
    serve.add_argument("--max-start-keys", type=int,
                       help="keys of one start's messages, content parts and tools (20000)")
    serve.add_argument("--max-json-depth", type=int,
                       help="nesting of arrays/objects in an inbound frame (32)")
    serve.add_argument("--max-json-containers", type=int,
                       help="'[' and '{' characters in an inbound frame (32768)")
    serve.add_argument("--max-error-body-bytes", type=int,
                       help="bytes of an upstream HTTP error body read, the rest not (8192)")
    serve.add_argument("--max-event-bytes", type=int,
                       help="one upstream SSE line or event; above it the stream fails "
                       "upstream_error (1048576)")
    serve.add_argument("--max-decompressed-bytes", type=int,
                       help="bytes one compressed upstream response may inflate to (256 MiB)")
    serve.add_argument("--max-decompression-ratio", type=float,
                       help="inflated/compressed bytes of an upstream response, past its "
                       "first MiB (200)")
    serve.add_argument("--log-level", help="debug, info, warning, error (info)")
    serve.add_argument("--log-json", action="store_true", default=None,
                       help="log JSON lines instead of text")
    serve.add_argument("--loop", dest="event_loop", choices=("auto", "asyncio", "uvloop"),
                       help="event loop: 'auto' takes uvloop when installed (auto)")
    serve.add_argument("--auth", action="store_true", default=None,
                       help="require credentials: an API key or a signed token (the token "
                       "secret comes from RELAY_TOKEN_SECRET, never a flag)")
    serve.add_argument("--api-key", action="append", dest="api_keys",
                       help="accepted API key, plain or sha256:<hex> (repeatable; prefer "
                       "RELAY_API_KEYS, flags show up in ps)")
    serve.add_argument("--token-budget", type=int, dest="completion_token_budget_per_hour",
                       help="completion tokens per principal per hour (default: no budget)")
    _add_worker_arguments(serve)
    _add_token_parser(sub)
    _add_check_parser(sub)
    return parser


def _add_check_parser(sub: _Commands) -> None:
    check = sub.add_parser(
        "check", help="show what each model alias of a config would do",
        description="Per model alias: the streaming path (fast or LiteLLM) and why, the "
        "endpoint URL, and whether its key variable is set (never the key). With --probe, "
        "one request of at most one token per alias, and what came back. Exit 0 only when "
        "every alias is usable.")
    check.add_argument("--config", required=True, help="TOML file of model aliases")
    check.add_argument("--probe", action="store_true",
                       help="make one 1-token request per alias (costs a token each)")
    check.add_argument("--timeout", type=float, default=30.0,
                       help="seconds a probe may take (30)")


def _add_worker_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--workers", metavar="N",
                       help="relay processes sharing the port (SO_REUSEPORT), for more cores; "
                       "'auto' = one per CPU; above 1 needs --redis (1)")
    # Set by the supervisor (relay.runtime.workers) on the processes it starts; not for users.
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)


def _add_token_parser(sub: _Commands) -> None:
    token = sub.add_parser("token", help="signed tokens for browsers",
                           description="Signed tokens (JWT, HS256) for clients that cannot "
                           "keep an API key, such as browsers.")
    actions = token.add_subparsers(dest="token_command", required=True)
    mint = actions.add_parser("mint", help="print a signed token",
                              description="Print a token signed with the relay's token secret "
                              "(--secret or RELAY_TOKEN_SECRET).")
    mint.add_argument("--sub", required=True, help="the principal (user id)")
    mint.add_argument("--ttl", type=int, default=300, help="seconds until it expires (300)")
    mint.add_argument("--models", help="comma-separated aliases it may use (default: all)")
    mint.add_argument("--max-streams", type=int, help="concurrent streams it may run")
    mint.add_argument("--secret", help="signing secret (default: env RELAY_TOKEN_SECRET)")


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "token":
        return _token_mint(args)
    if args.command == "check":
        return _check(args)
    return 2


def _check(args: argparse.Namespace) -> int:
    """``relay check``: 0 when every alias is usable, 1 when one is not, 2 when the config
    does not load."""
    from pydantic import ValidationError

    from relay.config import RelaySettings

    try:
        settings = RelaySettings(config=args.config)
    except ValidationError as exc:
        print(f"relay: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from relay.app import ConfigError, build_registry

    try:
        registry = build_registry(settings, require_env=False)
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        return 2
    from relay.check import check_aliases

    reports = asyncio.run(check_aliases(registry.specs, probe=args.probe,
                                        timeout=args.timeout))
    for report in reports:
        print("\n".join(report.lines()), flush=True)
    unusable = [r.alias for r in reports if not r.usable]
    if unusable:
        print(f"not usable: {', '.join(unusable)}", flush=True)
        return 1
    print(f"all {len(reports)} alias(es) usable", flush=True)
    return 0


def _token_mint(args: argparse.Namespace) -> int:
    from relay.core.auth import mint_token

    secret = args.secret or os.environ.get("RELAY_TOKEN_SECRET")
    if not secret:
        print("relay: no token secret: pass --secret or set RELAY_TOKEN_SECRET", file=sys.stderr)
        return 2
    models = None
    if args.models is not None:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        token = mint_token(secret, args.sub, args.ttl, models=models,
                           max_streams=args.max_streams)
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from relay.config import RelaySettings

    overrides: dict[str, Any] = {
        key: value for key, value in vars(args).items()
        if key not in ("command", "workers", "worker_index") and value is not None
    }
    try:
        settings = RelaySettings(**overrides)
    except (ValidationError, SettingsError) as exc:
        print(_settings_error_message(exc, overrides), file=sys.stderr)
        return 2
    from relay.logs import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a stuck
    # relay (or a slow shutdown) waits, in production as in tests.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    workers = _worker_count(args, settings)
    if workers is None:
        return 2
    from relay.runtime import eventloop

    try:
        loop = eventloop.choose_loop(settings.event_loop)
    except eventloop.LoopUnavailable as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    if workers > 1:
        from relay.runtime.workers import Supervisor

        return eventloop.run(Supervisor(settings, workers).run(), loop)
    from relay.app import ConfigError, build_registry

    try:
        registry = build_registry(settings)
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        return 2
    return eventloop.run(_run(settings, registry, worker_index=args.worker_index), loop)


def _settings_error_message(exc: Exception, flags_given: dict[str, Any]) -> str:
    """``relay: `` lines naming each refused setting where the user wrote it (the flag when
    one was given, else the ``RELAY_*`` variable) and why, instead of pydantic's dump. The
    value itself is never repeated (it may be a key)."""
    from pydantic import ValidationError

    # (argparse has no public way to list a subcommand's options)
    commands = next(action for action in _build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    options = {action.dest: max(action.option_strings, key=len)
               for action in commands.choices["serve"]._actions if action.option_strings}

    def where(field: str) -> str:
        if field in flags_given and field in options:
            return options[field]
        return f"RELAY_{field.upper()}"

    if not isinstance(exc, ValidationError):
        # pydantic-settings could not decode a variable (a list or dict is JSON there)
        import re

        found = re.search(r'field "(\w+)"', str(exc))
        name = where(found.group(1)) if found else "a RELAY_* variable"
        return (f"relay: {name} is not valid JSON (a list is written "
                '\'["a", "b"]\')')
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"][:1])
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"relay: {where(field)}: {message}" if field else f"relay: {message}")
    return "\n".join(lines)


def _bind_failure_message(exc: OSError, settings) -> str:
    """One line saying which address could not be bound and what to do (no traceback).
    asyncio names the address it failed on ("... on address ('host', port): ..."); the main
    port is the fallback when it does not."""
    import errno
    import re

    found = re.search(r"\('([^']*)', (\d+)", str(exc))
    host, port = (found.group(1), int(found.group(2))) if found else (settings.host,
                                                                      settings.port)
    flag = "--metrics-port" if port == settings.metrics_port and port != settings.port \
        else "--port"
    if exc.errno == errno.EADDRINUSE:
        return (f"relay: port {port} on {host} is already in use (another relay?): stop "
                f"that process, or pick another port with {flag} N (0 = any free port)")
    if exc.errno == errno.EACCES:
        return (f"relay: not allowed to listen on port {port} on {host} (ports below 1024 "
                f"need privileges): pick another port with {flag} N")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"relay: cannot listen on {host}: not an address of this machine; "
                "pick another with --host")
    return f"relay: cannot listen on {host}:{port}: {exc.strerror or exc}"


def _worker_count(args: argparse.Namespace, settings: RelaySettings) -> int | None:
    """Processes ``relay serve`` runs (``--workers``, else ``RELAY_WORKERS``, else 1); None
    after printing why the value is refused (the caller exits 2)."""
    from relay.runtime.workers import parse_workers

    if args.worker_index is not None:
        return 1                                   # a worker of a supervisor
    value = args.workers or os.environ.get("RELAY_WORKERS") or "1"
    try:
        count = parse_workers(value.strip())
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return None
    if count > 1 and settings.redis_url is None:
        print(f"relay: --workers {value} needs --redis URL: a reconnect may land on any "
              "worker, and only through Redis can it resume or cancel a stream another "
              "worker runs (or use --workers 1)", file=sys.stderr)
        return None
    return count


def _worker_server_options(worker_index: int | None) -> dict[str, Any]:
    """RelayServer options of a worker: the shared port, its metrics on loopback only."""
    if worker_index is None:
        return {}
    return {"reuse_port": True, "metrics_host": "127.0.0.1"}


def _announce_worker(server: RelayServer, registry: ModelRegistry, worker_index: int) -> None:
    """A worker's ``relay_worker_info`` metric and its ready line for the supervisor."""
    from prometheus_client import Gauge

    from relay.runtime.workers import worker_ready_line

    info = Gauge("relay_worker_info", "This worker process (value 1)", ["worker", "pid"],
                 registry=server.metrics.registry)
    info.labels(str(worker_index), str(os.getpid())).set(1)
    print(worker_ready_line(worker_index, server.metrics_port, registry.aliases), flush=True)


def _say(line: str) -> None:
    """Print a line to stdout; if stdout is a pipe whose reader is gone (a worker whose
    supervisor died before it could tell), to stderr from then on: the relay's shutdown
    must not fail on a line it prints."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        from relay.runtime.workers import write_stdout_to_stderr

        write_stdout_to_stderr()
        print(line, flush=True)


def _print_tasks() -> None:
    """Every task of the running loop and the whole chain of awaits it is suspended in
    (``Task.print_stack`` shows only the task's own coroutine), to stderr."""
    tasks = asyncio.all_tasks()
    out = [f"--- {len(tasks)} asyncio task(s) of pid {os.getpid()}"]
    for task in tasks:
        out.append(f"{task!r}")
        awaited: Any = task.get_coro()
        for _ in range(64):                       # (a chain is never this deep)
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None) \
                or getattr(awaited, "gi_frame", None)
            if frame is not None:
                out.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in "
                           f"{frame.f_code.co_name}")
            nxt = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None) \
                or getattr(awaited, "gi_yieldfrom", None)
            if nxt is not None and type(nxt).__name__ in ("async_generator_asend",
                                                          "async_generator_athrow"):
                # (`async for` over an async generator: the generator is its referent)
                import gc

                nxt = next((r for r in gc.get_referents(nxt)
                            if type(r).__name__ == "async_generator"), nxt)
            if nxt is None:
                if awaited is not task.get_coro() and not hasattr(awaited, "cr_frame"):
                    out.append(f"  awaiting {awaited!r}"[:300])
                break
            awaited = nxt
    print("\n".join(out), file=sys.stderr, flush=True)


async def _run(settings, registry, *, worker_index: int | None = None) -> int:
    from relay.cluster.redis_store import StoreUnavailable
    from relay.runtime.eventloop import running_loop_name
    from relay.runtime.server import RelayServer
    from relay.runtime.warmup import start_warm_up

    stop = asyncio.Event()
    supervisor_pid = os.getppid()    # a worker's parent: the supervisor that reads its stdout
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # `kill -USR2 <pid>`: every asyncio task and where it waits (SIGUSR1 shows threads only;
    # a relay that will not exit is usually one task waiting on another).
    loop.add_signal_handler(signal.SIGUSR2, _print_tasks)
    server = RelayServer(settings, registry, **_worker_server_options(worker_index))
    try:
        await server.start(listen=False)   # bound: a port in use fails here, at once
    except StoreUnavailable as exc:
        print(f"relay: cannot use Redis: {exc}", file=sys.stderr)
        await server.close()
        return 2
    except OSError as exc:  # the port is taken, or the host is not ours to bind
        await server.close()
        print(_bind_failure_message(exc, settings), file=sys.stderr)
        return 2
    try:
        # LiteLLM's lazy imports, tokenizer and first-stream setup, in a thread, finished
        # before connections are accepted: done while streams ran, they held the GIL in long
        # stretches (C-level import work) and stalled every connection's loop 0.5-0.8 s.
        warm_up = start_warm_up()
        await asyncio.to_thread(warm_up.done.wait)
        await server.listen()
        logging.getLogger("relay.cli").info("event loop: %s", running_loop_name())
        print(f"llm-relay listening on {server.url} (protocol llm-relay.v1); "
              f"models: {', '.join(registry.aliases)}", flush=True)
        if server.metrics_port is not None:
            print(f"llm-relay metrics on http://{settings.host}:{server.metrics_port}/metrics",
                  flush=True)
        if worker_index is not None:
            _announce_worker(server, registry, worker_index)
        await stop.wait()
        if worker_index is not None:
            from relay.runtime.workers import outlived_supervisor

            outlived_supervisor(supervisor_pid)
        # A second SIGINT/SIGTERM (Ctrl-C again) ends the drain: the streams still running
        # end at once, each with its finish (server_shutdown), and the relay exits.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.end_drain)
        _say(f"llm-relay draining (up to {settings.drain_timeout:g} s), then closing; "
             "Ctrl-C again to end the streams now")
        await server.shutdown()
    finally:
        await server.close()
    return 0
