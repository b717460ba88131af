"""The lifecycle of one hub stream, sans-I/O: states, events, one transition table.

This module owns the rules of PROTOCOL.md "Resume" as data. It imports nothing of the event
loop: ``transition(state, event, resumable)`` returns the new state and the *effects* the hub
(``relay.runtime.hub.StreamHub``) carries out (cancel the upstream call, arm or disarm the stream's
one named timer, notify an attachment, give the stream's bytes back). ``ByteBudget`` is the
relay-wide count of bytes the streams' logs hold, charged only by the stream records
(``HubStream.append``/``trim_through``/``release``), so it is right by construction.

The rules (each a row of ``_TABLE`` below):

* *Attached* means one attachment or more: a stream has at most one *owner* attachment
  (its ``start``'s connection, or whoever took it over) and any number of *viewers* (a
  ``resume`` joins as a viewer by default; PROTOCOL.md "Viewers"). Viewers are attachments
  like the owner, not a second state machine: the hub picks the event by how many
  attachments the stream has (``ATTACH``/``DETACH`` for the first and the last one,
  ``JOIN``/``LEAVE`` for the others), and the states only say attached or not.
* A local stream starts ``RUNNING_DETACHED`` with no timer; its connection attaches it before
  the loop runs anything else (``ATTACH`` -> ``RUNNING_ATTACHED``).
* ``ATTACH`` of an attached stream is a takeover (``"takeover": true``): every other
  attachment, owner and viewers, is told (``NOTIFY_TAKEN_OVER``). Attaching a detached
  running stream disarms its grace timer. ``JOIN`` (a viewer, or an owner into a slot left
  free while viewers watched) and ``LEAVE`` (an attachment goes while others stay) change
  nothing.
* ``DETACH`` (the last attachment's connection is gone) of a running stream: when streams
  are resumable (``detach_grace > 0``) arm the ``GRACE`` timer; otherwise cancel the
  upstream call at once.
* ``TAKEN_OVER`` (an attachment the hub does not see attach to this record replaced the
  ones here: a takeover on another relay, or a taking-over follower of a remote stream
  here) is a ``DETACH`` whose attachments are told (``NOTIFY_TAKEN_OVER``).
* ``GRACE_OVER`` (nobody resumed; on relays sharing Redis, nobody follows it elsewhere either):
  cancel upstream and drop the stream. ``HELD_ELSEWHERE`` (another relay follows it) arms
  the grace again.
* ``FINISH`` (the finish frame is logged): a resumable stream stays ``FINISHED_RETAINED`` for
  the grace (``RETENTION`` timer, armed whether or not it is attached); an unresumable one is
  ``FINISHED_ATTACHED`` until its connection sent the finish and detached, then dropped; one
  nobody is attached to is dropped at once. ``RETENTION_OVER`` drops a retained stream.
* ``EVICT`` (the logs exceed ``max_log_bytes``; the hub picks the oldest detached streams):
  cancel upstream if running, drop, and remember the key as ``LOST`` (a resume gets
  ``stream_lost``).
* ``CANCEL`` (client cancel, or a cancel from another relay) stops a running upstream; after
  the finish it changes nothing. ``CLOSE`` (relay shutdown) cancels running streams and
  releases followed ones.
* A stream running on another relay and followed here from Redis is ``REMOTE_FOLLOWED``
  until its finish arrives (``FINISH``) or the follower fails (``FAIL``: the attachment is
  told, ``NOTIFY_FAILED``: every attachment of the record) -> ``REMOTE_ENDED``. A followed
  record holds exactly one attachment (each remote viewer reads Redis on its own).
  ``DETACH``, ``TAKEN_OVER`` or ``CLOSE`` releases it (stops the follower). A cancel is
  forwarded to its owner.
* Every way out of the hub's table (``DROPPED``, ``LOST``) carries ``RELEASE``: the stream
  gives its bytes back to the budget and stops counting; frames its task still appends
  (a cancelled stream's finish) are not charged. ``DROPPED`` and ``LOST`` are final: the
  late reports of a stream that left the table (its task's finish, a follower's failure, a
  cancel or detach from a connection still attached to a retained stream dropped at the
  end of its retention) are accepted and change nothing.

Any (state, event) pair not in the table is a bug in the caller: ``transition`` raises
``IllegalTransition``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ByteBudget", "Effect", "Event", "IllegalTransition", "Outcome", "SharedState",
           "State", "TERMINAL", "Timer", "transition"]


class State(enum.Enum):
    RUNNING_ATTACHED = "running-attached"
    RUNNING_DETACHED = "running-detached"
    #: Finished; its one connection still has frames to send (streams not resumable).
    FINISHED_ATTACHED = "finished-attached"
    #: Finished; kept resumable for the grace (attached or not).
    FINISHED_RETAINED = "finished-retained"
    REMOTE_FOLLOWED = "remote-followed"
    #: Followed from Redis; its finish arrived or the follower failed.
    REMOTE_ENDED = "remote-ended"
    DROPPED = "dropped"
    LOST = "lost"


class Event(enum.Enum):
    ATTACH = "attach"
    DETACH = "detach"
    FINISH = "finish"
    GRACE_OVER = "grace-over"
    HELD_ELSEWHERE = "held-elsewhere"
    RETENTION_OVER = "retention-over"
    EVICT = "evict"
    CANCEL = "cancel"
    CLOSE = "close"
    FAIL = "fail"
    TAKEN_OVER = "taken-over"
    #: Another attachment joins an attached stream (a viewer).
    JOIN = "join"
    #: One attachment goes while others stay.
    LEAVE = "leave"


class Timer(enum.Enum):
    """The stream's one timer, by what its expiry means."""

    #: Detached and running: nobody resumed within ``detach_grace`` -> ``GRACE_OVER``.
    GRACE = "grace"
    #: Finished: the log stays resumable for ``detach_grace`` -> ``RETENTION_OVER``.
    RETENTION = "retention"


class Effect(enum.Enum):
    #: Stop the upstream call (the source's ``cancel``); the hub supplies the reason.
    CANCEL_UPSTREAM = "cancel-upstream"
    ARM_GRACE = "arm-grace"
    ARM_RETENTION = "arm-retention"
    DISARM_TIMER = "disarm-timer"
    #: Tell the previous attachments (those not attached any more) they were taken over.
    NOTIFY_TAKEN_OVER = "notify-taken-over"
    #: Tell every attachment (if any) the stream cannot go on.
    NOTIFY_FAILED = "notify-failed"
    #: Leave the hub's table: give the log's bytes back to the budget, stop counting.
    RELEASE = "release"
    #: Remember the key as lost (a resume gets ``stream_lost``) and clear the log.
    MARK_LOST = "mark-lost"
    #: Stop following a remote stream (its follower task and attached marker).
    STOP_FOLLOWER = "stop-follower"


TERMINAL = frozenset({State.DROPPED, State.LOST})


class SharedState(enum.StrEnum):
    """A stream's state in the record relays sharing Redis keep of it (``meta:K`` ``state``,
    ``relay.cluster.redis_store``): the lifecycle as the other relays of a group see it. The
    value is what Redis holds; its owner's mirror writes it (``running`` at launch, then
    ``finished`` or ``lost``), the relays following or resuming it read it. The one map
    between the two lifecycles:

    * ``owner_states``: the states of the stream on its owner while its record says this
      (``SharedState.of`` is the inverse, for a local stream);
    * ``follower_event``: what a follower here (``REMOTE_FOLLOWED``) makes of it once its
      log is read to the end: ``None`` keep reading (``running``, unless the owner is gone);
      ``FINISH`` its finish is in the log (``finished``); ``FAIL`` its frames cannot be
      replayed (``lost``: the resume gets ``stream_lost``, as for ``State.LOST`` here).
    """

    RUNNING = "running"
    FINISHED = "finished"
    #: The log in Redis has a hole (its owner's cap trimmed frames the mirror never copied).
    LOST = "lost"

    @property
    def owner_states(self) -> frozenset[State]:
        return _OWNER_STATES[self]

    @property
    def follower_event(self) -> Event | None:
        return _FOLLOWER_EVENTS[self]

    @classmethod
    def of(cls, state: State) -> SharedState:
        """The shared state of a local stream in ``state`` (a stream followed from another
        relay has its owner's: ``ValueError``)."""
        for shared, states in _OWNER_STATES.items():
            if state in states:
                return shared
        raise ValueError(f"{state} is not a state of a stream run here")


_OWNER_STATES: dict[SharedState, frozenset[State]] = {
    SharedState.RUNNING: frozenset({State.RUNNING_ATTACHED, State.RUNNING_DETACHED}),
    # A dropped stream was finished, or cancelled upstream (its finish follows, and its
    # mirror then records it finished).
    SharedState.FINISHED: frozenset({State.FINISHED_ATTACHED, State.FINISHED_RETAINED,
                                     State.DROPPED}),
    SharedState.LOST: frozenset({State.LOST}),
}
_FOLLOWER_EVENTS: dict[SharedState, Event | None] = {
    SharedState.RUNNING: None,
    SharedState.FINISHED: Event.FINISH,
    SharedState.LOST: Event.FAIL,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    state: State
    effects: tuple[Effect, ...] = ()


@dataclass(frozen=True, slots=True)
class _ByResumability:
    """Rows whose outcome depends on whether streams are resumable (``detach_grace > 0``)."""

    resumable: Outcome
    unresumable: Outcome


class IllegalTransition(RuntimeError):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"no transition for event {event.value!r} in state {state.value!r}")
        self.state = state
        self.event = event


S, E, X = State, Event, Effect
_DROP = (X.DISARM_TIMER, X.RELEASE)
_UNFOLLOW = (X.STOP_FOLLOWER, X.RELEASE)

_TABLE: dict[tuple[State, Event], Outcome | _ByResumability] = {
    # running, attached to a connection
    (S.RUNNING_ATTACHED, E.ATTACH): Outcome(S.RUNNING_ATTACHED, (X.NOTIFY_TAKEN_OVER,)),
    (S.RUNNING_ATTACHED, E.DETACH): _ByResumability(
        Outcome(S.RUNNING_DETACHED, (X.ARM_GRACE,)),
        Outcome(S.RUNNING_DETACHED, (X.CANCEL_UPSTREAM,))),
    (S.RUNNING_ATTACHED, E.TAKEN_OVER): _ByResumability(
        Outcome(S.RUNNING_DETACHED, (X.NOTIFY_TAKEN_OVER, X.ARM_GRACE)),
        Outcome(S.RUNNING_DETACHED, (X.NOTIFY_TAKEN_OVER, X.CANCEL_UPSTREAM))),
    (S.RUNNING_ATTACHED, E.FINISH): _ByResumability(
        Outcome(S.FINISHED_RETAINED, (X.ARM_RETENTION,)),
        Outcome(S.FINISHED_ATTACHED)),
    (S.RUNNING_ATTACHED, E.JOIN): Outcome(S.RUNNING_ATTACHED),
    (S.RUNNING_ATTACHED, E.LEAVE): Outcome(S.RUNNING_ATTACHED),
    (S.RUNNING_ATTACHED, E.CANCEL): Outcome(S.RUNNING_ATTACHED, (X.CANCEL_UPSTREAM,)),
    (S.RUNNING_ATTACHED, E.CLOSE): Outcome(S.RUNNING_ATTACHED, (X.CANCEL_UPSTREAM,)),
    # running, nobody attached (just launched, or within the grace, or cancelled on detach)
    (S.RUNNING_DETACHED, E.ATTACH): Outcome(S.RUNNING_ATTACHED, (X.DISARM_TIMER,)),
    (S.RUNNING_DETACHED, E.FINISH): _ByResumability(
        Outcome(S.FINISHED_RETAINED, (X.DISARM_TIMER, X.ARM_RETENTION)),
        Outcome(S.DROPPED, _DROP)),
    (S.RUNNING_DETACHED, E.GRACE_OVER): Outcome(S.DROPPED, (X.CANCEL_UPSTREAM, *_DROP)),
    (S.RUNNING_DETACHED, E.HELD_ELSEWHERE): Outcome(S.RUNNING_DETACHED, (X.ARM_GRACE,)),
    (S.RUNNING_DETACHED, E.EVICT): Outcome(S.LOST, (X.CANCEL_UPSTREAM, *_DROP, X.MARK_LOST)),
    (S.RUNNING_DETACHED, E.CANCEL): Outcome(S.RUNNING_DETACHED, (X.CANCEL_UPSTREAM,)),
    (S.RUNNING_DETACHED, E.CLOSE): Outcome(S.RUNNING_DETACHED,
                                           (X.DISARM_TIMER, X.CANCEL_UPSTREAM)),
    # finished, unresumable: its connection still sends the rest
    (S.FINISHED_ATTACHED, E.DETACH): Outcome(S.DROPPED, _DROP),
    (S.FINISHED_ATTACHED, E.TAKEN_OVER): Outcome(S.DROPPED, (X.NOTIFY_TAKEN_OVER, *_DROP)),
    (S.FINISHED_ATTACHED, E.CANCEL): Outcome(S.FINISHED_ATTACHED),
    (S.FINISHED_ATTACHED, E.CLOSE): Outcome(S.FINISHED_ATTACHED),
    # finished, resumable for the grace
    (S.FINISHED_RETAINED, E.ATTACH): Outcome(S.FINISHED_RETAINED, (X.NOTIFY_TAKEN_OVER,)),
    (S.FINISHED_RETAINED, E.DETACH): Outcome(S.FINISHED_RETAINED),
    (S.FINISHED_RETAINED, E.JOIN): Outcome(S.FINISHED_RETAINED),
    (S.FINISHED_RETAINED, E.LEAVE): Outcome(S.FINISHED_RETAINED),
    (S.FINISHED_RETAINED, E.TAKEN_OVER): Outcome(S.FINISHED_RETAINED, (X.NOTIFY_TAKEN_OVER,)),
    (S.FINISHED_RETAINED, E.RETENTION_OVER): Outcome(S.DROPPED, _DROP),
    (S.FINISHED_RETAINED, E.EVICT): Outcome(S.LOST, (*_DROP, X.MARK_LOST)),
    (S.FINISHED_RETAINED, E.CANCEL): Outcome(S.FINISHED_RETAINED),
    (S.FINISHED_RETAINED, E.CLOSE): Outcome(S.FINISHED_RETAINED, (X.DISARM_TIMER,)),
    # running on another relay, followed here from Redis
    (S.REMOTE_FOLLOWED, E.ATTACH): Outcome(S.REMOTE_FOLLOWED, (X.NOTIFY_TAKEN_OVER,)),
    (S.REMOTE_FOLLOWED, E.DETACH): Outcome(S.DROPPED, _UNFOLLOW),
    (S.REMOTE_FOLLOWED, E.TAKEN_OVER): Outcome(S.DROPPED, (X.NOTIFY_TAKEN_OVER, *_UNFOLLOW)),
    (S.REMOTE_FOLLOWED, E.FINISH): Outcome(S.REMOTE_ENDED),
    (S.REMOTE_FOLLOWED, E.FAIL): Outcome(S.REMOTE_ENDED, (X.NOTIFY_FAILED,)),
    (S.REMOTE_FOLLOWED, E.CANCEL): Outcome(S.REMOTE_FOLLOWED, (X.CANCEL_UPSTREAM,)),
    (S.REMOTE_FOLLOWED, E.CLOSE): Outcome(S.DROPPED, _UNFOLLOW),
    (S.REMOTE_ENDED, E.DETACH): Outcome(S.DROPPED, _UNFOLLOW),
    (S.REMOTE_ENDED, E.TAKEN_OVER): Outcome(S.DROPPED, (X.NOTIFY_TAKEN_OVER, *_UNFOLLOW)),
    (S.REMOTE_ENDED, E.CANCEL): Outcome(S.REMOTE_ENDED),
    (S.REMOTE_ENDED, E.CLOSE): Outcome(S.DROPPED, _UNFOLLOW),
    # out of the table. Its task may still log its finish (a cancelled stream), a follower
    # may still report, and a retained stream dropped while attached still has its
    # connection (which may cancel or go away): none of that changes anything any more.
    (S.DROPPED, E.FINISH): Outcome(S.DROPPED),
    (S.DROPPED, E.FAIL): Outcome(S.DROPPED),
    (S.DROPPED, E.CANCEL): Outcome(S.DROPPED),
    (S.DROPPED, E.DETACH): Outcome(S.DROPPED),
    (S.DROPPED, E.LEAVE): Outcome(S.DROPPED),
    (S.LOST, E.FINISH): Outcome(S.LOST),
}
del S, E, X


def transition(state: State, event: Event, resumable: bool) -> Outcome:
    """The outcome of ``event`` in ``state``; ``resumable``: streams outlive their
    connection (``detach_grace > 0``). Raises ``IllegalTransition`` for a pair the rules do
    not allow."""
    row = _TABLE.get((state, event))
    if row is None:
        raise IllegalTransition(state, event)
    if isinstance(row, _ByResumability):
        return row.resumable if resumable else row.unresumable
    return row


def legal_pairs() -> frozenset[tuple[State, Event]]:
    """Every (state, event) the table allows (for tests and documentation)."""
    return frozenset(_TABLE)


class ByteBudget:
    """Bytes held by the logs of the streams in the hub's table, against ``limit``.

    Charged only through the stream records, each of which counts its own log from the
    moment it enters the table until it leaves it (``Effect.RELEASE``); so ``total`` is
    always the sum of those logs' ``bytes`` and never negative. ``on_over`` is called after
    a charge leaves ``total`` above ``limit`` (the hub evicts)."""

    def __init__(self, limit: int, on_over: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.total = 0
        self.peak = 0
        self.on_over = on_over

    def charge(self, delta: int, *, check: bool = False) -> None:
        """Add ``delta`` (negative: bytes given back). ``check``: a frame was logged; call
        ``on_over`` if the total is now above the limit."""
        total = self.total + delta
        if total < 0:
            raise AssertionError(f"byte budget would go negative ({total})")
        self.total = total
        if total > self.peak:
            self.peak = total
        if check and total > self.limit and self.on_over is not None:
            self.on_over()

    @property
    def over(self) -> bool:
        return self.total > self.limit
