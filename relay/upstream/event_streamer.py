"""EventStreamer: one streaming completion (LiteLLM, or the provider's SSE read directly)
turned into typed stream events. The seed's public ``TokenStreamer`` is a thin subclass of it
in ``relay/token_streamer.py`` (imported as ``relay.streamer``); the relay itself uses this
class.

Contract of ``events()``:

* It yields ``TextDelta``, ``ReasoningDelta``, ``RefusalDelta``, ``ToolCallDelta``, then on a
  normal end one ``ToolCallDone`` per assembled call (whatever finish_reason the provider
  gave), and always exactly one ``StreamEnd`` last, whatever happened.
* ``cancel()`` takes effect at once: if the consumer is waiting for the provider, that wait
  is interrupted; the upstream HTTP response is closed (``aclose``) before ``StreamEnd``
  (status ``cancelled``) is yielded, and no text follows a cancel.
* Timeouts are timers, not checks between chunks: first token, idle between chunks and
  total duration each interrupt a silent provider and end with status ``timeout``.
* Usage is the provider's own when it sent any (``estimated=False``); otherwise an estimate
  by LiteLLM's token counter (``estimated=True``). LiteLLM's stream wrapper strips the
  provider's usage chunks and always synthesises a usage of its own, so the decision is
  made from what the provider actually sent (counted as the wrapper records its chunks, of
  which a running stream keeps only a bounded few: ``ProviderChunkWindow``).
* It never retries once anything was yielded. ``retries_before_first_token`` (default 0)
  is the one explicit opt-in for retrying a failed *connect*, for the codes in
  ``relay.upstream.errors.RETRYABLE_CONNECT_FAILURES`` (PROTOCOL.md states the rule).

Two upstreams feed the same loop (timers, cancel, tool-call assembly, usage) with the
same ``relay.upstream.deltas.Delta`` values: LiteLLM's stream wrapper (``_LiteLLMUpstream``),
or, with a ``fast_route``, the provider's SSE read directly (``relay/upstream/fast/``). While
``events()`` runs, LiteLLM skips its post-stream response assembly
(``relay.upstream.llm.begin_relay_stream``).

Concurrency: one ``events()`` iteration at a time per instance; ``cancel()`` may be called
from any task of the same event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llm_relay_protocol import ErrorCode, FinishReason, FinishStatus

from relay.upstream import admission
from relay.upstream.deltas import Delta, ToolCallPiece, UpstreamReader, UsageInfo
from relay.upstream.llm import DEMO_MODEL
from relay.upstream.raw_tap import RawTap
from relay.upstream.errors import (
    RELAY_BUG, RETRYABLE_CONNECT_FAILURES, ProviderStreamError, UpstreamFailure,
    classify_upstream_exception,
    is_provider_failure,
)
from relay.upstream.failure_log import failure_cause, upstream_host


__all__ = [
    "ReasoningDelta",
    "RefusalDelta",
    "StreamEnd",
    "StreamEvent",
    "TextDelta",
    "Timeouts",
    "EventStreamer",
    "ToolCallDelta",
    "ToolCallDone",
    "UsageInfo",
]

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    #: How many of the provider's chunks the text came in: consecutive text chunks that
    #: arrived in one network read are one delta (the fast path; LiteLLM's path: always 1).
    chunks: int = 1


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class RefusalDelta:
    """Text of the model's refusal to answer (OpenAI's ``delta.refusal``, structured
    outputs), streamed as the provider streams it; never mixed into the answer's text."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    call_id: str
    name: str | None
    arguments_delta: str


@dataclass(frozen=True, slots=True)
class ToolCallDone:
    index: int
    call_id: str
    name: str
    arguments: str


class DirectRoute(Protocol):
    """A way to call a provider without LiteLLM's chunk objects
    (``relay.upstream.fast.routing.FastRoute`` implements it). A port: the streamer names
    what it needs instead of importing the fast path."""

    def refusal(self, kwargs: dict[str, Any]) -> str | None:
        """Why this request must go through LiteLLM's own path, or None."""

    async def open(self, kwargs: dict[str, Any]) -> UpstreamReader:
        """Send the request; return the open upstream or raise LiteLLM's exception for it."""


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """Always the last event. ``reason`` is a documented ``FinishReason`` or error code."""

    status: FinishStatus
    reason: str
    usage: UsageInfo
    error: UpstreamFailure | None = None


StreamEvent = (TextDelta | ReasoningDelta | RefusalDelta | ToolCallDelta | ToolCallDone
               | StreamEnd)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; ``None`` disables one. Defaults are the relay's documented defaults."""

    first_token: float | None = 60.0
    idle: float | None = 30.0
    total: float | None = 600.0


# Provider finish reasons (after LiteLLM's mapping) -> the documented completed reasons.
_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "max_tokens": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "tool_use": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
    "safety": FinishReason.CONTENT_FILTER,
}

_CANCEL_REASONS = frozenset(
    (FinishReason.CLIENT_CANCEL, FinishReason.CLIENT_DISCONNECT, FinishReason.SERVER_SHUTDOWN)
)


class _Truncated(ProviderStreamError):
    """The provider's stream ended without a finish reason."""


class _Interrupted(Exception):
    """Raised inside ``events()`` when our own ``cancel()`` interrupted a provider wait."""


@dataclass
class _ToolCallState:
    index: int
    call_id: str
    provider_id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


CompletionFn = Callable[..., Awaitable[Any]]


def _default_completion() -> CompletionFn:
    from relay.upstream.llm import acompletion  # lazy: importing LiteLLM costs seconds

    return acompletion


class EventStreamer:
    """Streams one completion at a time from ``model`` through LiteLLM.

    ``model`` is a LiteLLM model string (``"openai/gpt-4o-mini"``), or ``"demo"`` for the
    embedded demo model (no key, no network). A string LiteLLM cannot route ends the stream
    ``failed``/``bad_request`` with a message saying how to name the model.
    ``completion`` (keyword) injects the ``acompletion``-compatible callable; tests pass a
    scripted one. ``fast_route`` (a ``relay.upstream.fast.routing.FastRoute``) makes the
    streamer read the provider's SSE itself instead of going through LiteLLM's chunk objects
    (same events, same timers, cancel and errors; see ``relay/upstream/fast/``); a request
    the route does not accept still goes through ``completion``. ``completion_kwargs`` are
    extra server-side LiteLLM arguments (never from a client).
    """

    def __init__(
        self,
        model: str,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        completion: CompletionFn | None = None,
        timeouts: Timeouts | None = None,
        completion_kwargs: dict[str, Any] | None = None,
        retries_before_first_token: int = 0,
        fast_route: DirectRoute | None = None,
    ) -> None:
        self.model = DEMO_MODEL if model == "demo" else model
        self.api_key = api_key
        self.base_url = base_url
        self.timeouts = timeouts or Timeouts()
        self._completion = completion
        self._completion_kwargs = dict(completion_kwargs or {})
        self._retries_before_first_token = retries_before_first_token
        self._fast_route = fast_route
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget the previous stream's state, including a cancel (not while a stream runs)."""
        self._cancel_reason: str | None = None
        self._clear_stream_state()

    def _clear_stream_state(self) -> None:
        #: The path this stream's request took ("fast" or "litellm"), once it was opened.
        self.path_taken: str | None = None
        self._text_parts: list[str] = []   # the stream's text so far (joined on demand)
        self._usage: UsageInfo | None = None
        self._waiting_task: asyncio.Task | None = None
        self._deadline: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_deadline = 0.0   # the deadline the watchdog was armed for
        self._interrupted = False       # an interrupt of the current wait was sent
        self._response: Any = None
        self._close_task: asyncio.Task | None = None

    def cancel(self, reason: str = FinishReason.CLIENT_CANCEL) -> None:
        """Stop the running stream now and close the upstream request. Idempotent.

        ``reason`` is ``client_cancel`` (default), ``client_disconnect`` or
        ``server_shutdown``; it becomes the final event's ``reason``.
        """
        if reason not in _CANCEL_REASONS:
            raise ValueError(f"not a cancel reason: {reason!r}")
        if self._cancel_reason is not None:
            return
        self._cancel_reason = str(reason)
        task = self._waiting_task
        if task is not None:
            # The consumer is blocked on the provider: interrupt that wait (unless the
            # deadline watchdog just did: one interrupt per wait, so exactly one
            # cancellation request is ours to consume).
            if not self._interrupted:
                self._interrupted = True
                task.cancel(msg=_CANCEL_MSG)
        elif self._response is not None:
            # The consumer is busy elsewhere: close the upstream now, not at its next read.
            self._close_task = asyncio.ensure_future(self._close_response())

    @property
    def accumulated_content(self) -> str:
        """The text of the current (or last) stream so far."""
        return self._join_text()

    def _join_text(self) -> str:
        # Joined on demand, not per token: ``str +=`` on an attribute copies the whole
        # text each time (quadratic in the stream's length).
        parts = self._text_parts
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    @property
    def usage(self) -> UsageInfo | None:
        """Usage of the last finished stream."""
        return self._usage

    @property
    def cancelled(self) -> bool:
        return self._cancel_reason is not None

    # ------------------------------------------------------------------ core

    async def events(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        **params: Any,
    ) -> AsyncGenerator[StreamEvent, None]:
        """Run one streaming completion; see the module docstring for the contract.

        A ``cancel()`` that came before this call (and after the last ``reset()``) still
        applies: the stream then ends ``cancelled`` without contacting the provider.
        """
        self._clear_stream_state()
        from relay.upstream.llm import begin_relay_stream, end_relay_stream

        loop = asyncio.get_running_loop()
        started = loop.time()
        tm = self.timeouts
        total_deadline = started + tm.total if tm.total is not None else None
        first_deadline = started + tm.first_token if tm.first_token is not None else None
        kwargs = self._request_kwargs(messages, tools, tool_choice, params)

        text_parts = self._text_parts
        other_parts: list[str] = []  # reasoning and tool arguments, for estimates
        calls = _ToolCalls()
        finish_reason: str | None = None
        refused = False
        got_first = False
        last_chunk_at = started
        end: StreamEnd | None = None
        relay_stream = begin_relay_stream()  # lean LiteLLM: no post-stream assembly
        try:
            upstream = await self._open(kwargs, loop, total_deadline, first_deadline)
            self._response = upstream
            if self._cancel_reason is not None:
                raise _Interrupted
            next_batch = upstream.next_batch
            while True:
                if got_first:
                    deadline = _min(total_deadline,
                                    last_chunk_at + tm.idle if tm.idle is not None else None)
                else:
                    deadline = _min(total_deadline, first_deadline)
                batch = await self._wait(next_batch(), deadline)
                if batch is None:
                    break
                last_chunk_at = loop.time()
                if len(batch) > 1:
                    batch = _joined_text_runs(batch)
                for delta in batch:
                    if delta.finish_reason:
                        finish_reason = delta.finish_reason
                    reasoning = delta.reasoning
                    if reasoning:
                        got_first = True
                        other_parts.append(reasoning)
                        yield ReasoningDelta(reasoning)
                    content = delta.content
                    if content:
                        got_first = True
                        text_parts.append(content)
                        yield TextDelta(content, delta.chunks)
                    refusal = delta.refusal
                    if refusal:
                        got_first = refused = True
                        other_parts.append(refusal)
                        yield RefusalDelta(refusal)
                    if delta.tool_calls:
                        got_first = True
                        for piece in delta.tool_calls:
                            event = _merge_tool_delta(calls, piece)
                            if event.arguments_delta:
                                other_parts.append(event.arguments_delta)
                            yield event
                    if self._cancel_reason is not None:
                        raise _Interrupted
            if finish_reason is None or upstream.truncated:
                # The provider's stream ended without saying it finished, or without a single
                # parseable chunk: truncated. (LiteLLM's Anthropic parser swallows a malformed
                # event and everything after it, and its wrapper then makes up a "stop".)
                raise _Truncated
            usage = await self._final_usage(upstream, kwargs, text_parts, other_parts)
            reason = _FINISH_REASONS.get(finish_reason, FinishReason.STOP)
            if calls and reason == FinishReason.STOP:
                # Some providers report "stop" after tool calls; the calls still complete.
                reason = FinishReason.TOOL_CALLS
            if refused and reason == FinishReason.STOP:
                # A refusal ends with "stop" (OpenAI); the finish says why there is no answer.
                reason = FinishReason.CONTENT_FILTER
            for state in sorted(calls.values(), key=lambda s: s.index):
                yield ToolCallDone(state.index, state.provider_id or state.call_id,
                                   state.name or "", "".join(state.arguments))
            end = StreamEnd(FinishStatus.COMPLETED, str(reason), usage)
        except _Interrupted:
            end = StreamEnd(
                FinishStatus.CANCELLED,
                self._cancel_reason or str(FinishReason.CLIENT_CANCEL),
                await self._estimate(kwargs, text_parts, other_parts),
            )
        except TimeoutError:
            now = loop.time()
            if total_deadline is not None and now >= total_deadline:
                reason, what = FinishReason.TOTAL_TIMEOUT, "total stream duration"
            elif not got_first:
                reason, what = FinishReason.FIRST_TOKEN_TIMEOUT, "first token"
            else:
                reason, what = FinishReason.IDLE_TIMEOUT, "idle time between chunks"
            end = StreamEnd(
                FinishStatus.TIMEOUT,
                str(reason),
                await self._estimate(kwargs, text_parts, other_parts),
                UpstreamFailure(ErrorCode.UPSTREAM_TIMEOUT,
                                f"the provider exceeded the {what} limit"),
            )
        except Exception as exc:  # any failure ends the stream, never the caller
            if is_provider_failure(exc):
                failure = classify_upstream_exception(exc, mid_stream=self._response is not None)
                logger.warning("upstream failure for model %s at %s: %s (%s)", self.model,
                               upstream_host(exc, kwargs.get("api_base")) or "its default "
                               "endpoint", failure.code, failure_cause(exc))
            else:
                # A bug in the relay's own code, not the provider's doing: said so on the
                # wire (internal_error), with its traceback in the log.
                failure = RELAY_BUG
                logger.exception("relay bug while streaming model %s", self.model)
            end = StreamEnd(
                FinishStatus.FAILED,
                str(failure.code),  # a plain string, like the completed reasons
                await self._estimate(kwargs, text_parts, other_parts),
                failure,
            )
        finally:
            self._stop_watchdog()
            # Close the upstream HTTP response on every path, also when our consumer's task
            # is being cancelled from outside or the consumer stopped iterating.
            await self._close_response()
            self._response = None
            end_relay_stream(relay_stream)
        self._usage = end.usage
        # One string from here on, not a part per token: a finished stream's streamer may be
        # kept as long as its log is resumable (tests/relay/test_log_memory.py).
        self._join_text()
        yield end

    # ------------------------------------------------------------------ internals

    def _request_kwargs(self, messages, tools, tool_choice, params) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(self._completion_kwargs)
        kwargs.update({k: v for k, v in params.items() if v is not None})
        kwargs["model"] = self.model
        kwargs["messages"] = messages
        kwargs["stream"] = True
        kwargs["stream_options"] = {"include_usage": True}
        # LiteLLM and the OpenAI SDK both retry by default; a relay must not.
        kwargs["num_retries"] = 0
        kwargs["max_retries"] = 0
        if tools:
            kwargs["tools"] = tools
            if tool_choice is not None:
                kwargs["tool_choice"] = tool_choice
        if self.api_key is not None:
            kwargs["api_key"] = self.api_key
        if self.base_url is not None:
            kwargs["api_base"] = self.base_url
        return kwargs

    async def _open(self, kwargs: dict[str, Any], loop: asyncio.AbstractEventLoop,
                    total_deadline: float | None,
                    first_deadline: float | None) -> UpstreamReader:
        """Start the request; returns the upstream's reader."""
        fast = self._fast_route
        if fast is not None:
            why = fast.refusal(kwargs)
            if why is not None:
                # This request needs something only LiteLLM's own path does: said once per
                # request, and counted by path (relay_requests_total).
                fast = None
                logger.info("model %s: request goes through LiteLLM's path, not the fast "
                            "path: %s", self.model, why,
                            extra={"model": self.model, "path": "litellm"})
        self.path_taken = "litellm" if fast is None else "fast"
        completion = self._completion or _default_completion()
        attempts = 1 + max(0, self._retries_before_first_token)
        for attempt in range(attempts):
            try:
                if fast is not None:
                    return await self._wait(_admitted(fast.open, kwargs),
                                            _min(total_deadline, first_deadline))
                response = await self._wait(_admitted(completion, **kwargs),
                                            _min(total_deadline, first_deadline))
                return _LiteLLMUpstream(response)
            except (_Interrupted, TimeoutError):
                raise
            except Exception as exc:
                if not is_provider_failure(exc):
                    raise                  # a relay bug: retrying cannot help
                code = classify_upstream_exception(exc).code
                if attempt + 1 >= attempts or code not in RETRYABLE_CONNECT_FAILURES:
                    raise
                logger.info("retrying connect to %s (%s), attempt %d", self.model, code,
                            attempt + 2)
        raise AssertionError("unreachable")

    async def _wait(self, awaitable, deadline: float | None):
        """Await a provider operation, interruptible by ``cancel()`` and by ``deadline``.

        The deadline is enforced by one lazy watchdog timer per stream, not a timer per
        chunk: it is armed at the earliest deadline, and when it fires early (the deadline
        moved on with each chunk) it re-arms itself at the current one. So a chunk costs
        no timer scheduling and cancelling, which was a measurable share of a token's CPU.
        """
        if self._cancel_reason is not None:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise _Interrupted
        task = asyncio.current_task()
        self._waiting_task = task
        self._deadline = deadline
        if deadline is not None:
            # Compared with the deadline it was armed for, not with ``watchdog.when()``: a
            # handle's own time depends on the machine (uvloop keeps whole milliseconds and
            # takes its start time after computing the delay, so on a loaded machine a handle
            # says it fires milliseconds after the deadline it was asked for); comparing with
            # it re-armed the watchdog for chunk after chunk there (43 timers for 300 chunks).
            watchdog = self._watchdog
            if watchdog is None or self._watchdog_deadline > deadline:
                if watchdog is not None:
                    watchdog.cancel()
                self._arm_watchdog(asyncio.get_running_loop(), deadline)
        try:
            return await awaitable
        except asyncio.CancelledError as exc:
            if self._interrupted and exc.args in ((_CANCEL_MSG,), (_TIMEOUT_MSG,)):
                # Our own interrupt: consume exactly that one cancellation request. Anyone
                # else's pending cancellation still propagates.
                if task is not None and task.uncancel() > 0:
                    raise
                if exc.args == (_TIMEOUT_MSG,):
                    raise TimeoutError from None
                raise _Interrupted from None
            raise
        finally:
            self._waiting_task = None
            self._deadline = None
            self._interrupted = False

    def _on_watchdog(self) -> None:
        self._watchdog = None
        task, deadline = self._waiting_task, self._deadline
        if task is None or deadline is None:
            return                        # between waits: the next wait arms it again
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:
            self._arm_watchdog(loop, deadline)
        elif not self._interrupted:
            self._interrupted = True
            task.cancel(msg=_TIMEOUT_MSG)

    def _arm_watchdog(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self._watchdog = loop.call_at(deadline, self._on_watchdog)
        self._watchdog_deadline = deadline

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def _close_response(self) -> None:
        response = self._response
        if response is None:
            return
        if self._close_task is not None and self._close_task is not asyncio.current_task():
            task, self._close_task = self._close_task, None
            await task
            return
        aclose = getattr(response, "aclose", None)
        if aclose is None:
            return
        try:
            await aclose()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # closing is best effort; the stream has ended anyway
            logger.debug("closing upstream response failed: %s", type(exc).__name__)
        self._response = None

    async def _final_usage(self, upstream, kwargs, text_parts, other_parts) -> UsageInfo:
        provider = upstream.provider_usage()
        if provider is not None:
            return provider
        return await self._estimate(kwargs, text_parts, other_parts)

    async def _estimate(self, kwargs, text_parts, other_parts) -> UsageInfo:
        """Usage by the tokenizer, counted in a worker thread: a long prompt or answer takes
        milliseconds to count (8.5 ms per 20,000 words here), which must not hold the loop
        that serves every other stream (tiktoken releases the GIL while it encodes)."""
        messages, tools = kwargs.get("messages") or [], kwargs.get("tools")
        text = "".join(text_parts) + "".join(other_parts)

        def count() -> UsageInfo:
            return UsageInfo(_estimate_prompt_tokens(self.model, messages, tools),
                             _estimate_text_tokens(self.model, text), estimated=True)

        return await asyncio.to_thread(count)


_CANCEL_MSG = "llm-relay: EventStreamer.cancel()"
_TIMEOUT_MSG = "llm-relay: EventStreamer deadline"


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a < b else b


class _ToolCalls(dict):
    """The stream's tool calls by their index in the frames (``_ToolCallState``), and what
    ``_merge_tool_delta`` needs to tell which call a provider's delta belongs to."""

    __slots__ = ("by_provider_index", "by_provider_id", "last")

    def __init__(self) -> None:
        super().__init__()
        self.by_provider_index: dict[int, _ToolCallState] = {}
        self.by_provider_id: dict[str, _ToolCallState] = {}
        self.last: _ToolCallState | None = None


def _merge_tool_delta(calls: _ToolCalls, piece: ToolCallPiece) -> ToolCallDelta:
    """Add one provider tool-call piece to the call it belongs to, or start a new call.

    * With an ``index``: the call last seen at that index continues, unless the delta
      brings an id other than that call's: a new id is a new call (LiteLLM numbers the calls
      of every delta without an index from 0; Ollama-style servers repeat index 0).
    * Without an index (Gemini's OpenAI-compatible endpoint): the same id continues its
      call, a new id starts a new call, and no id continues the last call.

    A new call takes the provider's index when it is free, else the next free one, so the
    frames' ``index`` stays the provider's for providers that number their calls.
    """
    index, provider_id, name, args = piece.index, piece.call_id, piece.name, piece.arguments
    if isinstance(index, int):
        state = calls.by_provider_index.get(index)
        if state is not None and provider_id and state.provider_id not in (None, provider_id):
            state = None
    elif provider_id:
        state = calls.by_provider_id.get(provider_id)
    else:
        state = calls.last
    if state is None:
        number = index if isinstance(index, int) and index not in calls else (
            max(calls) + 1 if calls else 0)
        state = _ToolCallState(number, provider_id or "call_" + secrets.token_hex(12))
        calls[number] = state
    if isinstance(index, int):
        calls.by_provider_index[index] = state
    if provider_id and state.provider_id is None:
        state.provider_id = provider_id
    if provider_id:
        calls.by_provider_id.setdefault(provider_id, state)
    calls.last = state
    if name and not state.name:
        state.name = name
    if args:
        state.arguments.append(args)
    return ToolCallDelta(state.index, state.provider_id or state.call_id, name or None, args)


def _joined_text_runs(batch: Sequence[Delta]) -> list[Delta]:
    """``batch`` with every run of consecutive text-only deltas (no reasoning, refusal or
    tool call) joined into one ``Delta`` whose ``chunks`` says how many it joined (its finish
    reason the run's last): chunks that arrived together become one ``TextDelta`` (one
    frame) that says how many chunks it carries."""
    out: list[Delta] = []
    run: list[Delta] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            finish = None
            for delta in run:
                finish = delta.finish_reason or finish
            out.append(Delta(None, "".join([d.content for d in run if d.content]), None,
                             finish, None, len(run)))
        run.clear()

    for delta in batch:
        if (delta.content and not delta.reasoning and not delta.tool_calls
                and delta.refusal is None and delta.chunks == 1):
            run.append(delta)
            continue
        flush()
        out.append(delta)
    flush()
    return out


async def _admitted(open_request, *args, **kwargs):
    """``await open_request(*args, **kwargs)`` (what starts a provider request) once the
    loop's ``OpenGate`` admits it (relay/upstream/admission.py): a burst of starts then cannot
    hold up the tokens of the streams already running. Nothing is called before that."""
    await admission.gate().admit()
    return await open_request(*args, **kwargs)


class _LiteLLMUpstream:
    """LiteLLM's stream wrapper (or an injected look-alike) as an upstream of the loop in
    ``EventStreamer.events()`` (an ``UpstreamReader``): ``next_batch()`` turns one chunk into
    its ``Delta`` (``None`` at the end); before it, what the wrapper lost of the provider's
    chunks and ``relay.upstream.raw_tap.RawTap`` recovered (refusal text, a tool input),
    and tool calls numbered as the provider numbered them (or not).
    """

    __slots__ = ("response", "_iterator", "_tap")

    def __init__(self, response: Any) -> None:
        self.response = response
        chunks = getattr(response, "chunks", None)
        if type(chunks) is list:
            # LiteLLM's wrapper appends every chunk it makes to this list and keeps it for
            # the stream's life (~5.8 KB per token here, counted by no budget); the window
            # keeps only what the wrapper and the relay read back (tests/relay/test_litellm_memory.py).
            response.chunks = ProviderChunkWindow(chunks)
        self._tap = RawTap.install(response)
        stream = getattr(response, "completion_stream", None)
        if stream is not None and inspect.isasyncgenfunction(getattr(type(stream), "__aiter__", None)):
            # The wrapper runs ``async for`` over this stream once per chunk it returns; an
            # ``__aiter__`` that is an async generator (the openai SDK's ``AsyncStream``) then
            # makes a new generator per chunk, left suspended and closed later by a task of
            # its own: a backlog of ~2 KB per token until the loop gets its turn (a fast
            # upstream fills it by thousands). One iteration serves every ``async for``.
            response.completion_stream = _OneIteration(stream)
        self._iterator = response.__aiter__()

    async def next_batch(self) -> Sequence[Delta] | None:
        tap = self._tap
        try:
            chunk = await self._iterator.__anext__()
        except StopAsyncIteration:
            if tap is not None and tap.pending:
                return tuple(tap.take_pending())
            if tap is not None and tap.failure is not None:
                raise tap.failure from None
            return None
        if tap is not None and tap.failure is not None:
            # A provider chunk the wrapper read past was of the wrong shape: the stream fails
            # there, after what the tap kept from before it, and ``chunk`` is not handed on.
            if tap.pending:
                return tuple(tap.take_pending())
            raise tap.failure from None
        deltas = self._deltas(chunk, tap)
        if tap is not None and tap.pending:
            return (*tap.take_pending(), *deltas)
        return deltas

    @staticmethod
    def _deltas(chunk: Any, tap: RawTap | None) -> tuple[Delta, ...]:
        choices = chunk.choices
        if not choices:
            return ()
        choice = choices[0]
        delta = choice.delta
        if delta is None:
            return (Delta(None, None, None, choice.finish_reason),)
        tool_calls = delta.tool_calls
        pieces: list[ToolCallPiece] | None = None
        if tool_calls:
            raw_indexes = tap.tool_indexes if tap is not None else None
            if raw_indexes is not None and len(raw_indexes) != len(tool_calls):
                raw_indexes = None
            pieces = []
            for n, tc in enumerate(tool_calls):
                fn = getattr(tc, "function", None)
                index = raw_indexes[n] if raw_indexes is not None else getattr(tc, "index", None)
                args = (getattr(fn, "arguments", None) if fn is not None else None) or ""
                call_id = getattr(tc, "id", None) or None
                name = getattr(fn, "name", None) if fn is not None else None
                if (tap is not None and index in tap.replaced and call_id is None
                        and name is None and args == "{}"):
                    continue  # the tap supplied this Anthropic block's arguments
                pieces.append(ToolCallPiece(index, call_id, name, args))
        return (Delta(getattr(delta, "reasoning_content", None), delta.content, pieces or None,
                      choice.finish_reason),)

    @property
    def truncated(self) -> bool:
        # Without a single parseable chunk, LiteLLM's wrapper still makes up a finish.
        chunks = getattr(self.response, "chunks", None)
        if isinstance(chunks, ProviderChunkWindow):
            return chunks.appended == 0
        return chunks == []

    def provider_usage(self) -> UsageInfo | None:
        return _provider_usage(self.response)

    async def aclose(self) -> None:
        aclose = getattr(self.response, "aclose", None)
        if aclose is not None:
            await aclose()


class _OneIteration:
    """An async iterable whose every ``__aiter__()`` continues the same single iteration of
    ``stream`` (other attributes are the stream's). ``aclose`` closes that iteration, then
    the stream."""

    __slots__ = ("_stream", "_iterator")

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._iterator = stream.__aiter__()

    def __aiter__(self) -> _OneIteration:
        return self

    def __anext__(self) -> Awaitable[Any]:
        return self._iterator.__anext__()

    async def aclose(self) -> None:
        try:
            await self._iterator.aclose()
        finally:
            aclose = getattr(self._stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _provider_usage(response: Any) -> UsageInfo | None:
    """The provider's own usage, or ``None`` when it sent none.

    LiteLLM's ``CustomStreamWrapper`` appends every processed chunk to ``.chunks`` (for a
    relay stream a ``ProviderChunkWindow``, which counts the usage as chunks arrive); only
    chunks built from a provider payload that had usage carry a usage object there. The
    usage it emits to us at the end is computed and may be its own estimate.
    """
    chunks = getattr(response, "chunks", None)
    if not chunks:
        return None
    if isinstance(chunks, ProviderChunkWindow):
        return chunks.provider_usage()
    window = ProviderChunkWindow()
    for chunk in chunks:
        window.append(chunk)
    return window.provider_usage()


class ProviderChunkWindow(list):
    """Stands in for ``CustomStreamWrapper.chunks``: takes every chunk LiteLLM's wrapper
    appends, keeps a bounded few.

    The wrapper appends each chunk it makes (a pydantic ``ModelResponseStream`` holding the
    provider's parsed payload, ~5.8 KB per token) and keeps them all until the stream ends,
    for its post-stream response assembly, which relay streams skip (``_install_lean_streaming``).
    What is still read back while a relay stream runs, and kept here:

    * the last two chunks appended (the wrapper's repetition check reads ``[-1]`` and ``[-2]``;
      its finish handler looks back for a ``service_tier``);
    * the first and the latest chunk that carried the provider's usage (the wrapper's usage
      total reads them: the latest has the running total, Anthropic's first has the prompt);
    * the provider's usage as the relay reads it (the largest prompt and completion counts
      any chunk carried: ``provider_usage()``), and how many chunks were appended at all.

    So a stream holds at most four chunks, whatever its length. Only ``append`` is used by the
    wrapper; the list's contents are rebuilt from the kept chunks after each one.
    """

    __slots__ = ("appended", "_first_usage", "_last_usage", "_previous", "_last",
                 "_prompt_tokens", "_completion_tokens")

    def __init__(self, chunks: Any = ()) -> None:
        super().__init__()
        self.appended = 0
        self._first_usage: Any = None
        self._last_usage: Any = None
        self._previous: Any = None
        self._last: Any = None
        self._prompt_tokens: int | None = None
        self._completion_tokens: int | None = None
        for chunk in chunks:
            self.append(chunk)

    def append(self, chunk: Any) -> None:
        self.appended += 1
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self._count_usage(usage)
            if self._first_usage is None:
                self._first_usage = chunk
            else:
                self._last_usage = chunk
        self._previous, self._last = self._last, chunk
        kept = [c for c in (self._first_usage, self._last_usage)
                if c is not None and c is not self._previous and c is not chunk]
        if self._previous is not None:
            kept.append(self._previous)
        kept.append(chunk)
        self[:] = kept

    def _count_usage(self, usage: Any) -> None:
        p = getattr(usage, "prompt_tokens", None)
        c = getattr(usage, "completion_tokens", None)
        if isinstance(p, int) and p > 0:
            self._prompt_tokens = max(self._prompt_tokens or 0, p)
        if isinstance(c, int) and c > 0:
            self._completion_tokens = max(self._completion_tokens or 0, c)

    def provider_usage(self) -> UsageInfo | None:
        """The largest prompt and completion counts the provider sent, or ``None`` if no
        chunk carried any."""
        if self._prompt_tokens is None and self._completion_tokens is None:
            return None
        return UsageInfo(self._prompt_tokens or 0, self._completion_tokens or 0, estimated=False)


def _estimate_prompt_tokens(model: str, messages: list, tools: list | None) -> int:
    try:
        from litellm import token_counter

        return int(token_counter(model=model, messages=messages, tools=tools))
    except Exception:
        text = " ".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
        return max(1, len(text) // 4)


def _estimate_text_tokens(model: str, text: str) -> int:
    if not text:
        return 0
    try:
        from litellm import token_counter

        return int(token_counter(model=model, text=text, count_response_tokens=True))
    except Exception:
        return max(1, len(text) // 4)
