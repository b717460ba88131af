"""RelayClient reconnect + resume against a live relay (real sockets, embedded demo model).

Connections are broken for real: the client's transport aborted (a network drop, no close
frame), the relay's side of the session aborted or closed with a code, the relay stopped.
The application's ``async for`` must see the same events as an uninterrupted run."""

from __future__ import annotations

import asyncio
import json

import pytest

from llm_relay_protocol import Finish, Started, Token, ToolCallChunk, ToolCallComplete
from llm_relay_client import (
    ConnectionLost, HandshakeFailed, RelayClient, RelayStream, StreamTakenOver,
)
from relay.upstream.demo import demo_reply_tokens

from .helpers import Client, eventually, start_relay, text_of

PROMPT = "please resume this answer without losing a single word of it " * 3
MESSAGES = [{"role": "user", "content": PROMPT}]
FULL_TEXT = "".join(demo_reply_tokens(MESSAGES))
SEARCH_TOOL = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}}}}}
TOOL_MESSAGES = [{"role": "user", "content": "the weather in Paris and in Rome and in Berlin "
                                             "tomorrow morning and the day after"}]
FAST = {"backoff": 0.01, "backoff_max": 0.05}   # reconnect quickly in tests


def _kill(client: RelayClient) -> None:
    """The network drops under the client: no close frame, the socket is just gone."""
    assert client._ws is not None
    client._ws.transport.abort()


def _session(server):
    (session,) = server.sessions
    return session


def _assert_uninterrupted(events: list, stream: RelayStream) -> None:
    """One started first, one finish last (completed), seqs strictly increasing."""
    seqs = [ev.seq for ev in events]
    assert all(a < b for a, b in zip(seqs, seqs[1:])), seqs
    assert isinstance(events[0], Started) and events[0].seq == 0
    assert sum(isinstance(ev, Started) for ev in events) == 1
    assert sum(isinstance(ev, Finish) for ev in events) == 1
    assert isinstance(events[-1], Finish) and events[-1].status == "completed"
    assert stream.finish is events[-1]


async def _stream_killing_after(client: RelayClient, stream: RelayStream, kind: type,
                                count: int, kill) -> list:
    """Iterate ``stream``; after the ``count``-th event of type ``kind``, call ``kill()``."""
    events, seen, killed = [], 0, False
    async for ev in stream:
        events.append(ev)
        if isinstance(ev, kind):
            seen += 1
            if seen == count and not killed:
                killed = True
                result = kill()
                if asyncio.iscoroutine(result):
                    await result
    assert killed, "the stream ended before the connection was broken"
    return events


async def test_a_killed_client_socket_is_invisible_to_the_stream():
    async with start_relay(detach_grace=5, demo_tps=200) as server, \
            RelayClient(server.url, **FAST) as c:
        expected = await c.complete("demo", MESSAGES)
        assert expected.text == FULL_TEXT
        s = c.stream("demo", MESSAGES)
        events = await _stream_killing_after(c, s, Token, 3, lambda: _kill(c))
        _assert_uninterrupted(events, s)
        assert s.text == "".join(ev.text for ev in events if isinstance(ev, Token)) == FULL_TEXT
        assert s.finish.reason == expected.reason == "stop"
        assert s.usage.completion_tokens == expected.usage.completion_tokens
        assert s.resumes == 1 and c.reconnects == 1 and c.last_close[0] == 1006
        # The new connection works for everything else too.
        assert c.state == "open" and await c.ping() >= 0
        assert (await c.complete("demo", MESSAGES)).text == FULL_TEXT


async def test_a_tool_call_stream_resumes_with_the_same_tool_calls():
    async with start_relay(detach_grace=5, demo_tps=100) as server, \
            RelayClient(server.url, **FAST) as c:
        expected = await c.complete("demo", TOOL_MESSAGES, tools=[SEARCH_TOOL])
        assert len(expected.tool_calls) == 1
        s = c.stream("demo", TOOL_MESSAGES, tools=[SEARCH_TOOL])
        events = await _stream_killing_after(c, s, ToolCallChunk, 1, lambda: _kill(c))
    _assert_uninterrupted(events, s)
    assert s.resumes == 1
    assert [(t.index, t.call_id, t.name, t.arguments) for t in s.tool_calls] == \
        [(t.index, t.call_id, t.name, t.arguments) for t in expected.tool_calls]
    chunks = [ev for ev in events if isinstance(ev, ToolCallChunk)]
    assert len(chunks) > 1
    assert "".join(ch.arguments_delta for ch in chunks) == expected.tool_calls[0].arguments
    assert json.loads(s.tool_calls[0].arguments)["limit"] == 1
    assert s.finish.reason == "tool_calls"
    assert [type(ev) for ev in events].count(ToolCallComplete) == 1


async def test_several_streams_on_one_client_all_survive_one_drop():
    prompts = [[{"role": "user", "content": f"stream number {n} " + PROMPT}] for n in range(4)]
    async with start_relay(detach_grace=5, demo_tps=150) as server, \
            RelayClient(server.url, **FAST) as c:
        going = [asyncio.Event() for _ in prompts]

        async def run(n: int) -> tuple[list, RelayStream]:
            s = c.stream("demo", prompts[n], id=f"s{n}")
            events = []
            async for ev in s:
                events.append(ev)
                if sum(isinstance(e, Token) for e in events) == 2:
                    going[n].set()
            return events, s

        tasks = [asyncio.create_task(run(n)) for n in range(len(prompts))]
        await asyncio.gather(*(e.wait() for e in going))
        _kill(c)
        results = await asyncio.gather(*tasks)
    assert c.reconnects == 1
    for (events, s), messages in zip(results, prompts):
        _assert_uninterrupted(events, s)
        assert s.text == "".join(demo_reply_tokens(messages))
        assert s.resumes == 1


async def test_relay_side_abort_is_resumed():
    async with start_relay(detach_grace=5, demo_tps=200) as server, \
            RelayClient(server.url, **FAST) as c:
        s = c.stream("demo", MESSAGES)
        events = await _stream_killing_after(
            c, s, Token, 2, lambda: _session(server).ws.transport.abort())
    _assert_uninterrupted(events, s)
    assert s.text == FULL_TEXT and s.resumes == 1 and c.last_close[0] == 1006


@pytest.mark.parametrize("code", [1001, 1012, 4008])
async def test_retryable_close_codes_from_the_relay_are_resumed(code):
    async with start_relay(detach_grace=5, demo_tps=200) as server, \
            RelayClient(server.url, **FAST) as c:
        s = c.stream("demo", MESSAGES)
        events = await _stream_killing_after(
            c, s, Token, 2, lambda: _session(server).ws.close(code, "test"))
        assert c.last_close == (code, "test")
    _assert_uninterrupted(events, s)
    assert s.text == FULL_TEXT and s.resumes == 1


async def test_tokens_merged_in_the_replay_are_normal():
    """The client stays away until the detached stream has finished on the relay, so the
    whole rest of the answer comes back as a replay, with token frames merged."""
    async with start_relay(detach_grace=5, demo_tps=100) as server:
        calls = 0
        key: list[str] = []

        async def token() -> str | None:
            nonlocal calls
            calls += 1
            if calls > 1:   # the reconnect: wait until the relay has logged the finish
                await eventually(lambda: server.hub.get(key[0]).end is not None)
            return None

        async with RelayClient(server.url, token=token, **FAST) as c:
            s = c.stream("demo", MESSAGES)

            def kill() -> None:
                key.append(s.stream_key)
                _kill(c)

            events = await _stream_killing_after(c, s, Token, 2, kill)
    _assert_uninterrupted(events, s)
    tokens = [ev for ev in events if isinstance(ev, Token)]
    assert s.text == FULL_TEXT and calls == 2
    assert len(tokens) < len(demo_reply_tokens(MESSAGES))   # some frames were merged


async def test_cancel_and_new_streams_while_reconnecting_wait_for_the_new_connection():
    async with start_relay(detach_grace=5, demo_tps=50) as server, \
            RelayClient(server.url, **FAST) as c:
        s = c.stream("demo", MESSAGES)
        async for ev in s:
            if isinstance(ev, Token):
                _kill(c)
                break             # leaving the loop cancels the stream...
        # Let the client notice the drop (its connection task runs on the next await).
        while c.state == "open":
            await c._changed.wait()
        assert c.state == "reconnecting"
        # Neither waits for nor fails on the dead socket: both go to the new connection.
        other = asyncio.create_task(c.complete("demo", [{"role": "user", "content": "new"}]))
        await s.aclose()          # ...with a cancel sent after the stream's resume
        assert s.finish is not None and s.finish.status == "cancelled"
        assert s.finish.reason == "client_cancel" and s.resumes == 1
        result = await other
        assert result.text == "".join(demo_reply_tokens([{"role": "user", "content": "new"}]))
        assert await c.ping() >= 0


async def test_without_detach_grace_a_drop_raises_connection_lost_then_the_client_works():
    async with start_relay(detach_grace=0, demo_tps=50) as server, \
            RelayClient(server.url, **FAST) as c:
        s = c.stream("demo", MESSAGES)
        with pytest.raises(ConnectionLost) as info:
            await _stream_killing_after(c, s, Token, 2, lambda: _kill(c))
        lost = info.value
        assert lost.partial_text == s.text and FULL_TEXT.startswith(s.text)
        assert "".join(demo_reply_tokens(MESSAGES)[:2]) in s.text
        assert lost.close_code == 1006 and lost.stream_id == s.id and lost.code is None
        assert "detach_grace" in str(lost)
        # Reconnected (no resume to do): new streams work.
        assert (await c.complete("demo", MESSAGES)).text == FULL_TEXT
        assert c.reconnects == 1


async def test_resume_refused_by_the_relay_is_connection_lost_with_its_code():
    """The client stays away longer than detach_grace: the relay dropped the stream, and
    answers the resume with unknown_stream."""
    async with start_relay(detach_grace=0.3, demo_tps=50) as server:
        calls = 0
        key: list[str] = []

        async def token() -> None:
            nonlocal calls
            calls += 1
            if calls > 1:   # the reconnect: wait until the relay has dropped the stream
                await eventually(lambda: server.hub.get(key[0]) is None)

        async with RelayClient(server.url, token=token, **FAST) as c:
            s = c.stream("demo", MESSAGES)

            def kill() -> None:
                key.append(s.stream_key)
                _kill(c)

            with pytest.raises(ConnectionLost) as info:
                await _stream_killing_after(c, s, Token, 2, kill)
            assert info.value.code == "unknown_stream" and info.value.close_code == 1006
            assert info.value.partial_text == s.text and s.text
            assert FULL_TEXT.startswith(s.text) and s.text != FULL_TEXT
            assert c.state == "open" and await c.ping() >= 0


async def test_a_stream_taken_over_by_another_connection_raises_instead_of_hanging():
    """Another connection of the same principal resumes the client's running stream: the
    client's iteration ends with StreamTakenOver (a ConnectionLost with the partial text),
    its connection stays open, and the other connection gets the rest of the stream."""
    async with start_relay(detach_grace=5, demo_tps=50) as server, \
            RelayClient(server.url, **FAST) as c, Client.connect(server.url) as other:
        s = c.stream("demo", MESSAGES)
        tokens, text_at_resume, resumed_after = 0, "", -1
        with pytest.raises(StreamTakenOver) as info:
            async with asyncio.timeout(10):     # before the fix it waited forever
                async for ev in s:
                    if isinstance(ev, Token):
                        tokens += 1
                        if tokens == 2:
                            text_at_resume, resumed_after = s.text, ev.seq
                            await other.send({"type": "resume", "stream_key": s.stream_key,
                                              "after_seq": ev.seq, "id": "theirs",
                                              "takeover": True})
        lost = info.value
        assert isinstance(lost, ConnectionLost) and lost.code == "stream_taken_over"
        assert lost.stream_id == s.id and lost.close_code is None
        assert lost.partial_text == s.text and FULL_TEXT.startswith(s.text)
        assert s.done and s.finish is None
        assert (await other.next_for("theirs"))["type"] == "resumed"
        rest = await other.collect("theirs")
        assert rest[-1]["type"] == "finish" and rest[-1]["status"] == "completed"
        assert rest[0]["seq"] > resumed_after
        assert text_at_resume + text_of(rest) == FULL_TEXT
        # The client itself is unaffected: same connection, new streams work.
        assert c.state == "open" and c.reconnects == 0
        assert (await c.complete("demo", MESSAGES)).text == FULL_TEXT


async def test_a_non_retryable_close_ends_the_client_without_reconnecting():
    async with start_relay(detach_grace=5, demo_tps=50) as server:
        calls = 0

        def token() -> None:
            nonlocal calls
            calls += 1

        async with RelayClient(server.url, token=token, **FAST) as c:
            s = c.stream("demo", MESSAGES)
            with pytest.raises(ConnectionLost) as info:
                await _stream_killing_after(
                    c, s, Token, 2, lambda: _session(server).ws.close(4400, "test"))
            assert info.value.close_code == 4400 and info.value.partial_text == s.text
            assert c.state == "closed" and calls == 1 and c.reconnects == 0
            with pytest.raises(ConnectionLost):
                await c.ping()
            with pytest.raises(ConnectionLost):
                await c.complete("demo", MESSAGES)


async def test_a_refused_token_on_reconnect_stops_at_once():
    async with start_relay(auth=True, api_keys=["k"], detach_grace=5, demo_tps=50) as server:
        with pytest.raises(HandshakeFailed) as refused:
            async with RelayClient(server.url, token="bad", **FAST):
                pass
        assert refused.value.close_code == 4401
        tokens = iter(["k", "bad", "k", "k"])
        calls = 0

        def token() -> str:
            nonlocal calls
            calls += 1
            return next(tokens)

        async with RelayClient(server.url, token=token, max_reconnect_attempts=5,
                               **FAST) as c:
            s = c.stream("demo", MESSAGES)
            with pytest.raises(ConnectionLost) as info:
                await _stream_killing_after(c, s, Token, 2, lambda: _kill(c))
            assert info.value.close_code == 4401 and "invalid token" in str(info.value)
            assert info.value.partial_text == s.text
            assert calls == 2 and c.state == "closed"   # no reconnect loop


async def test_a_stopped_relay_ends_the_stream_after_the_bounded_attempts():
    async with start_relay(detach_grace=5, demo_tps=50) as server:
        attempts = 0

        def token() -> None:
            nonlocal attempts
            attempts += 1

        def crash() -> None:
            # The relay process dies: nothing listens any more, its sockets are gone.
            server._server.close(close_connections=False)
            _session(server).ws.transport.abort()

        async with RelayClient(server.url, token=token, max_reconnect_attempts=3,
                               **FAST) as c:
            s = c.stream("demo", MESSAGES)
            with pytest.raises(ConnectionLost) as info:
                await _stream_killing_after(c, s, Token, 2, crash)
            assert "gave up after 3 reconnect attempts" in str(info.value)
            assert info.value.partial_text == s.text and s.text
            assert info.value.close_code == 1006
            assert attempts == 1 + 3 and c.state == "closed"
            with pytest.raises(ConnectionLost):
                await c.ping()


async def test_reconnect_false_keeps_the_old_behaviour():
    async with start_relay(detach_grace=5, demo_tps=50) as server, \
            RelayClient(server.url, reconnect=False) as c:
        s = c.stream("demo", MESSAGES)
        with pytest.raises(ConnectionLost) as info:
            await _stream_killing_after(c, s, Token, 2, lambda: _kill(c))
        assert info.value.partial_text == s.text and info.value.close_code == 1006
        assert c.state == "closed"
        with pytest.raises(ConnectionLost):
            await c.complete("demo", MESSAGES)


async def test_a_client_closed_4008_for_reading_too_slowly_resumes():
    """The relay's real slow-consumer path: the client stops reading (its transport paused)
    until the relay closed it 4008 and detached the stream; then reads again, reconnects and
    resumes the rest."""
    content = " ".join(f"{'x' * 1000}{i}" for i in range(2000))    # a ~2 MB answer
    messages = [{"role": "user", "content": content}]
    async with start_relay(detach_grace=10, slow_consumer_bytes=256 * 1024,
                           slow_consumer_grace=1.0, send_buffer_bytes=16 * 1024,
                           max_messages_bytes=8 << 20, max_frame_bytes=8 << 20) as server, \
            RelayClient(server.url, **FAST) as c:
        slow = server.metrics.errors.labels("slow_consumer")

        async def pause_until_closed_4008() -> None:
            transport = c._ws.transport
            transport.pause_reading()
            await eventually(lambda: slow._value.get() >= 1, 20)
            transport.resume_reading()

        s = c.stream("demo", messages)
        events = await _stream_killing_after(c, s, Token, 1, pause_until_closed_4008)
        assert c.last_close[0] in (4008, 1006)    # 1006 if the relay gave up the handshake
    _assert_uninterrupted(events, s)
    assert s.text == "".join(demo_reply_tokens(messages))
    # A loaded machine may read the replay slowly enough for another 4008: resumed again.
    assert s.resumes >= 1 and c.reconnects == s.resumes


async def test_a_token_function_failing_on_reconnect_ends_the_stream_promptly():
    async with start_relay(detach_grace=5, demo_tps=50) as server:
        calls = 0

        def token() -> None:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise RuntimeError("token service down")

        async with RelayClient(server.url, token=token, **FAST) as c:
            s = c.stream("demo", MESSAGES)
            with pytest.raises(ConnectionLost) as info:
                await _stream_killing_after(c, s, Token, 2, lambda: _kill(c))
            assert "token service down" in str(info.value) and calls == 2
            assert info.value.partial_text == s.text and c.state == "closed"


async def test_a_token_expiring_on_an_open_connection_is_refreshed_and_the_start_sent_again():
    """The relay closes 4401 `token expired` at the first start after `exp`, leaving that
    start unanswered (PROTOCOL.md). With a token function the client reconnects with a fresh
    token and sends the start again (llm_relay_protocol.client_policy rule 1, as relay-client.js); a
    fresh token refused too (4401 before any welcome) is final: no loop."""
    from relay.core.auth import mint_token

    secret = "client-tests-secret-0123456789abcdef"
    minted: list[str] = []
    ttl = [300]

    def mint() -> str:
        minted.append(mint_token(secret, "alice", ttl[0]))
        return minted[-1]

    async with start_relay(auth=True, token_secret=secret, demo_tps=0) as server:
        async with RelayClient(server.url, token=mint, **FAST) as c:
            real = server.auth.clock
            server.auth.clock = lambda: real() + 3600   # the 300 s token has expired
            ttl[0] = 7200
            result = await c.complete("demo", MESSAGES)
            assert result.text == FULL_TEXT and result.status == "completed"
            assert c.reconnects == 1 and c.last_close == (4401, "token expired")
            assert len(minted) == 2 and c.state == "open"
            server.auth.clock = lambda: real() + 10 * 86400   # every token has expired
            with pytest.raises(ConnectionLost) as info:
                await c.complete("demo", [{"role": "user", "content": "x"}])
            assert info.value.close_code == 4401 and c.state == "closed"
            assert len(minted) == 3   # one refresh refused, no further attempt


async def test_a_stream_cancelled_before_its_start_ends_with_a_valid_local_finish():
    """llm_relay_protocol.client_policy rule 6: nothing reaches the relay, and the stream still ends
    with a schema-valid cancelled Finish (zero usage flagged estimated)."""
    async with start_relay() as server:
        async with RelayClient(server.url) as c:
            s = c.stream("demo", MESSAGES)
            await s.cancel()
            events = [event async for event in s]
            assert [type(e) for e in events] == [Finish] and s.finish is events[0]
            assert (s.finish.status, s.finish.reason) == ("cancelled", "client_cancel")
            assert s.usage.total_tokens == 0 and s.usage.estimated is True
            assert s.done
            assert (await c.complete("demo", MESSAGES)).text == FULL_TEXT
