"""The hub through its ports (relay.core.ports), with scripted sources and subscribers: no
socket, no Redis, no upstream.

One ``StreamSource`` interface covers the local upstream call and the follower of a stream
running on another relay: the hub's one task per stream runs either, and every change of a
stream, including what other relays ask (``PeerControl``), goes through the lifecycle
table (issue 12, items 1 and 2)."""

from __future__ import annotations

import asyncio

import pytest

from llm_relay_protocol import FinishStatus, frames
from relay.config import RelaySettings
from relay.core.lifecycle import State, Timer
from relay.core.limits import PrincipalState
from relay.core.outcome import StreamOutcome, TokenUsage
from relay.core.ports import SourceFailed
from relay.metrics import RelayMetrics
from relay.runtime.hub import VIEWER_BYTES, Attachment, StreamHub


class _Source:
    """A scripted source: logs ``tokens`` frames, then waits for ``finish_now`` (or a
    cancel), then logs its finish. ``fail``: raise ``SourceFailed`` instead of finishing."""

    def __init__(self, tokens: int = 2, fail: SourceFailed | None = None) -> None:
        self.tokens = tokens
        self.fail = fail
        self.cancels: list[str] = []
        self.finish_now = asyncio.Event()
        self.running = asyncio.Event()
        self.stopped = False

    def cancel(self, reason: str = "client_cancel") -> None:
        self.cancels.append(reason)
        self.finish_now.set()

    async def run(self, sink) -> None:
        try:
            for seq in range(1, self.tokens + 1):
                sink.append(frames.token(sink.id, seq, "word "))
            self.running.set()
            await self.finish_now.wait()
            if self.fail is not None:
                raise self.fail
            status = FinishStatus.CANCELLED if self.cancels else FinishStatus.COMPLETED
            sink.finish(self.tokens + 1,
                        StreamOutcome(status, "stop", TokenUsage(1, self.tokens, False)))
        finally:
            self.stopped = True


class _Followed(_Source):
    """A ``FollowedSource``: names the stream it reads on another relay."""

    def __init__(self, key: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.key, self.id, self.alias, self.after_seq = key, "q1", "demo", 0


class _Subscriber:
    """A connection as the hub sees it; like ``Session``, it detaches what it is told of."""

    def __init__(self, hub: StreamHub) -> None:
        self.hub = hub
        self.taken: list[Attachment] = []
        self.failures: list[tuple[str, str]] = []

    def taken_over(self, att: Attachment) -> None:
        self.taken.append(att)
        self.hub.detach(att)

    def failed(self, att: Attachment, code: str, message: str) -> None:
        self.failures.append((code, message))
        self.hub.detach(att)


def _hub(grace: float = 30.0) -> StreamHub:
    return StreamHub(RelaySettings(port=0, detach_grace=grace), RelayMetrics())


def _launch(hub: StreamHub, source: _Source, subscriber: _Subscriber | None = None):
    stream = hub.launch(id="q1", alias="demo", principal="p", session_id="s",
                        principal_state=PrincipalState(), source=source)
    att = None
    if subscriber is not None:
        att = Attachment(subscriber, stream, "q1")
        hub.attach(stream, att)
    return stream, att


def _follow(hub: StreamHub, source: _Followed, subscriber: _Subscriber, *,
            takeover: bool = False):
    stream = hub.follow(source, principal="p", session_id="s")
    hub.adopt(stream, takeover=takeover)
    att = Attachment(subscriber, stream, "q1")
    hub.attach(stream, att, takeover=takeover)
    return stream, att


async def test_a_local_source_runs_in_the_hubs_task_and_its_finish_moves_the_stream():
    hub = _hub()
    source = _Source(tokens=3)
    stream, _ = _launch(hub, source, _Subscriber(hub))
    await source.running.wait()
    assert stream.log.last_seq == 3 and hub.log_bytes == stream.log.bytes > 0
    assert hub.tasks() == [stream.task]
    source.finish_now.set()
    await stream.task
    assert stream.state is State.FINISHED_RETAINED and stream.timer_kind is Timer.RETENTION
    assert stream.end.status is FinishStatus.COMPLETED and stream.log.finished
    await hub.close("server_shutdown")


async def test_a_source_that_ends_without_its_finish_gets_the_hubs_fallback_finish():
    class _Silent(_Source):
        async def run(self, sink) -> None:
            sink.append(frames.token(sink.id, 1, "word "))

    hub = _hub()
    stream, _ = _launch(hub, _Silent(), _Subscriber(hub))
    await stream.task
    [last] = stream.log.after(1)
    assert (last.frame["type"], last.frame["seq"], last.frame["reason"]) == (
        "finish", 2, "internal_error")
    assert stream.state is State.FINISHED_RETAINED and stream.end is None
    await hub.close("server_shutdown")


async def test_a_followed_source_starts_when_adopted_and_its_finish_is_logged():
    hub = _hub()
    source = _Followed("k1")
    stream = hub.follow(source, principal="p", session_id="s")
    assert stream.remote and stream.task is None and hub.get("k1") is None
    hub.adopt(stream)
    att = Attachment(_Subscriber(hub), stream, "q1")
    hub.attach(stream, att)
    assert stream.viewers == [att] and stream.attachment is None   # a plain resume: a viewer
    await source.running.wait()
    assert hub.get("k1") is stream and hub.log_bytes == stream.log.bytes + VIEWER_BYTES
    assert hub.tasks() == []            # followers are no upstream calls of this relay
    source.finish_now.set()
    await stream.task
    assert stream.state is State.REMOTE_ENDED and stream.log.finished
    hub.detach(att)
    assert stream.state is State.DROPPED and hub.log_bytes == 0


async def test_a_failing_follower_tells_its_attachment_and_is_released():
    hub = _hub()
    subscriber = _Subscriber(hub)
    source = _Followed("k1", fail=SourceFailed("stream_lost", "its relay stopped"))
    stream, _ = _follow(hub, source, subscriber)
    await source.running.wait()
    source.finish_now.set()
    await stream.task
    assert subscriber.failures == [("stream_lost", "its relay stopped")]
    assert stream.state is State.DROPPED and hub.get("k1") is None and hub.log_bytes == 0


async def test_a_cancel_from_another_relay_goes_through_the_table():
    hub = _hub()
    local, followed = _Source(), _Followed("remote-key")
    stream, _ = _launch(hub, local, _Subscriber(hub))
    remote, _ = _follow(hub, followed, _Subscriber(hub))
    hub.cancelled_elsewhere("unknown")
    hub.cancelled_elsewhere(remote.key)          # the owner cancels it, not a follower
    assert followed.cancels == []
    hub.cancelled_elsewhere(stream.key)
    assert local.cancels == ["client_cancel"]
    await stream.task
    assert stream.end.status is FinishStatus.CANCELLED and stream.state is State.FINISHED_RETAINED
    hub.cancelled_elsewhere(stream.key)          # after the finish: changes nothing
    assert local.cancels == ["client_cancel"]
    await hub.close("server_shutdown")


@pytest.mark.parametrize("grace", [30.0, 0.0])
async def test_a_takeover_from_another_relay_detaches_through_the_table(grace):
    hub = _hub(grace)
    subscriber = _Subscriber(hub)
    source = _Source()
    stream, att = _launch(hub, source, subscriber)
    hub.taken_over_elsewhere(stream.key)
    assert subscriber.taken == [att] and stream.attachment is None
    assert stream.state is State.RUNNING_DETACHED
    if grace:
        assert stream.timer_kind is Timer.GRACE and source.cancels == []
    else:
        assert source.cancels == ["client_disconnect"]   # as a detach without grace
    hub.taken_over_elsewhere(stream.key)     # nobody attached here any more: nothing
    assert subscriber.taken == [att]
    await hub.close("server_shutdown")


async def test_a_taking_over_follower_takes_over_the_owner_attached_here():
    hub = _hub()
    first, second = _Subscriber(hub), _Subscriber(hub)
    old_source, new_source = _Followed("k1"), _Followed("k1")
    old, old_att = _follow(hub, old_source, first, takeover=True)
    await old_source.running.wait()
    new, _ = _follow(hub, new_source, second, takeover=True)
    assert first.taken == [old_att] and second.taken == []
    assert old.state is State.DROPPED and hub.get("k1") is new
    with pytest.raises(asyncio.CancelledError):
        await old.task                       # the old follower is stopped by the hub
    assert old_source.stopped
    await new_source.running.wait()
    assert hub.log_bytes == new.log.bytes
    await hub.close("server_shutdown")


async def test_close_stops_and_awaits_every_stream_task_followers_included():
    hub = _hub()
    local, followed = _Source(), _Followed("k1")
    stream, _ = _launch(hub, local, _Subscriber(hub))
    remote, _ = _follow(hub, followed, _Subscriber(hub))
    await local.running.wait()
    await followed.running.wait()
    await hub.close("server_shutdown")
    assert stream.task.done() and remote.task.done() and followed.stopped
    assert local.cancels == ["server_shutdown"]
    # The followed stream left the table; the local one is retained (its finish logged).
    assert hub.get(remote.key) is None and hub.log_bytes == stream.log.bytes


async def test_a_follower_that_breaks_ends_its_attachment_with_internal_error(caplog):
    class _Broken(_Followed):
        async def run(self, sink) -> None:
            sink.append(frames.token(sink.id, 1, "word "))
            raise KeyError("a bug in the follower")

    hub = _hub()
    subscriber = _Subscriber(hub)
    stream, _ = _follow(hub, _Broken("k1"), subscriber)
    with pytest.raises(KeyError):
        await stream.task
    assert [code for code, _ in subscriber.failures] == ["internal_error"]
    assert stream.state is State.DROPPED and hub.log_bytes == 0
    # (_task_done, added when the task started, ran before this await returned)
    assert any(r.getMessage() == "stream task failed" and r.exc_info for r in caplog.records)


async def test_followers_of_one_remote_stream_are_viewers_each_reading_on_its_own():
    hub = _hub()
    first, second, taker = _Subscriber(hub), _Subscriber(hub), _Subscriber(hub)
    a_source, b_source = _Followed("k1"), _Followed("k1")
    a, a_att = _follow(hub, a_source, first)
    b, b_att = _follow(hub, b_source, second)
    await a_source.running.wait()
    await b_source.running.wait()
    assert a is not b and hub.viewers_of("k1") == 2 and len(hub) == 2
    assert first.taken == second.taken == []
    assert hub.log_bytes == a.log.bytes + b.log.bytes + 2 * VIEWER_BYTES
    # A taking-over follower here ends both; then a takeover elsewhere ends it.
    c, c_att = _follow(hub, _Followed("k1"), taker, takeover=True)
    assert first.taken == [a_att] and second.taken == [b_att]
    assert a.state is b.state is State.DROPPED and hub.viewers_of("k1") == 0
    hub.taken_over_elsewhere("k1")
    assert taker.taken == [c_att] and c.state is State.DROPPED
    await hub.close("server_shutdown")
    assert hub.log_bytes == 0 and len(hub) == 0


async def test_viewers_of_a_local_stream_join_and_leave_without_moving_it():
    hub = _hub()
    source = _Source()
    owner = _Subscriber(hub)
    stream, owner_att = _launch(hub, source, owner)
    viewers = [Attachment(_Subscriber(hub), stream, f"v{i}") for i in range(2)]
    for att in viewers:
        assert hub.room_for_viewer(stream.key, takeover=False) is None
        hub.attach(stream, att, resume=True)
    assert stream.viewers == viewers and stream.attachment is owner_att
    await source.running.wait()
    assert hub.log_bytes == stream.log.bytes + 2 * VIEWER_BYTES
    # The owner goes: the viewers keep the stream attached (no grace timer).
    hub.detach(owner_att)
    assert stream.state is State.RUNNING_ATTACHED and stream.timer is None
    # A plain resume now takes the free owner slot.
    back = Attachment(_Subscriber(hub), stream, "back")
    hub.attach(stream, back, resume=True)
    assert stream.attachment is back and stream.viewers == viewers
    hub.detach(viewers[0])
    assert stream.state is State.RUNNING_ATTACHED and stream.viewers == viewers[1:]
    # A takeover ends every other attachment, owner and viewers.
    taker = Attachment(_Subscriber(hub), stream, "taker")
    hub.attach(stream, taker, resume=True, takeover=True)
    assert back.subscriber.taken == [back] and viewers[1].subscriber.taken == [viewers[1]]
    assert viewers[0].subscriber.taken == []          # (it had left already)
    assert stream.attachments() == [taker] and hub.log_bytes == stream.log.bytes
    # Taken over from another relay: it is told and the stream detaches.
    hub.taken_over_elsewhere(stream.key)
    assert taker.subscriber.taken == [taker] and not stream.attached
    assert stream.state is State.RUNNING_DETACHED and stream.timer_kind is Timer.GRACE
    await hub.close("server_shutdown")


async def test_the_viewer_cap_refuses_one_viewer_too_many_but_never_a_takeover():
    hub = StreamHub(RelaySettings(port=0, detach_grace=30, max_viewers_per_stream=2),
                    RelayMetrics())
    stream, _ = _launch(hub, _Source(), _Subscriber(hub))
    for i in range(2):
        hub.attach(stream, Attachment(_Subscriber(hub), stream, f"v{i}"), resume=True)
    refusal = hub.room_for_viewer(stream.key, takeover=False)
    assert refusal is not None and refusal.code == "too_many_streams"
    assert "2 viewers per stream" in refusal.message
    assert hub.room_for_viewer(stream.key, takeover=True) is None
    await hub.close("server_shutdown")
