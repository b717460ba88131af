"""The stream lifecycle table (relay.core.lifecycle), driven without sockets or an event loop.

``EXPECTED`` restates every rule of the module's header as (state, event) -> outcome, for
resumable relays (``detach_grace > 0``) and unresumable ones; the table must match it
exactly, and every pair not in it must raise. The byte accounting of a stream record
(``HubStream.enter``/``append``/``trim_through``/``release``) is checked on its own too.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

from relay.runtime.hub import HubStream
from relay.core.lifecycle import (
    TERMINAL,
    ByteBudget,
    Effect,
    Event,
    IllegalTransition,
    Outcome,
    SharedState,
    State,
    legal_pairs,
    transition,
)
from relay.core.limits import PrincipalState
from relay.core.streamlog import FrameLog

S, E, X = State, Event, Effect
DROP = (X.DISARM_TIMER, X.RELEASE)
UNFOLLOW = (X.STOP_FOLLOWER, X.RELEASE)


def both(state, *effects):
    o = Outcome(state, tuple(effects))
    return (o, o)


#: (state, event) -> (outcome when resumable, outcome when not).
EXPECTED: dict[tuple[State, Event], tuple[Outcome, Outcome]] = {
    (S.RUNNING_ATTACHED, E.ATTACH): both(S.RUNNING_ATTACHED, X.NOTIFY_TAKEN_OVER),
    (S.RUNNING_ATTACHED, E.DETACH): (Outcome(S.RUNNING_DETACHED, (X.ARM_GRACE,)),
                                     Outcome(S.RUNNING_DETACHED, (X.CANCEL_UPSTREAM,))),
    # taken over by an attachment on another relay (or a fresh follower): a DETACH whose
    # attachment is told
    (S.RUNNING_ATTACHED, E.TAKEN_OVER): (
        Outcome(S.RUNNING_DETACHED, (X.NOTIFY_TAKEN_OVER, X.ARM_GRACE)),
        Outcome(S.RUNNING_DETACHED, (X.NOTIFY_TAKEN_OVER, X.CANCEL_UPSTREAM))),
    (S.RUNNING_ATTACHED, E.FINISH): (Outcome(S.FINISHED_RETAINED, (X.ARM_RETENTION,)),
                                     Outcome(S.FINISHED_ATTACHED)),
    # a viewer joins, or one of several attachments leaves: nothing changes
    (S.RUNNING_ATTACHED, E.JOIN): both(S.RUNNING_ATTACHED),
    (S.RUNNING_ATTACHED, E.LEAVE): both(S.RUNNING_ATTACHED),
    (S.RUNNING_ATTACHED, E.CANCEL): both(S.RUNNING_ATTACHED, X.CANCEL_UPSTREAM),
    (S.RUNNING_ATTACHED, E.CLOSE): both(S.RUNNING_ATTACHED, X.CANCEL_UPSTREAM),
    (S.RUNNING_DETACHED, E.ATTACH): both(S.RUNNING_ATTACHED, X.DISARM_TIMER),
    (S.RUNNING_DETACHED, E.FINISH): (
        Outcome(S.FINISHED_RETAINED, (X.DISARM_TIMER, X.ARM_RETENTION)),
        Outcome(S.DROPPED, DROP)),
    (S.RUNNING_DETACHED, E.GRACE_OVER): both(S.DROPPED, X.CANCEL_UPSTREAM, *DROP),
    (S.RUNNING_DETACHED, E.HELD_ELSEWHERE): both(S.RUNNING_DETACHED, X.ARM_GRACE),
    (S.RUNNING_DETACHED, E.EVICT): both(S.LOST, X.CANCEL_UPSTREAM, *DROP, X.MARK_LOST),
    (S.RUNNING_DETACHED, E.CANCEL): both(S.RUNNING_DETACHED, X.CANCEL_UPSTREAM),
    (S.RUNNING_DETACHED, E.CLOSE): both(S.RUNNING_DETACHED, X.DISARM_TIMER,
                                        X.CANCEL_UPSTREAM),
    (S.FINISHED_ATTACHED, E.DETACH): both(S.DROPPED, *DROP),
    (S.FINISHED_ATTACHED, E.TAKEN_OVER): both(S.DROPPED, X.NOTIFY_TAKEN_OVER, *DROP),
    (S.FINISHED_ATTACHED, E.CANCEL): both(S.FINISHED_ATTACHED),
    (S.FINISHED_ATTACHED, E.CLOSE): both(S.FINISHED_ATTACHED),
    (S.FINISHED_RETAINED, E.ATTACH): both(S.FINISHED_RETAINED, X.NOTIFY_TAKEN_OVER),
    (S.FINISHED_RETAINED, E.DETACH): both(S.FINISHED_RETAINED),
    (S.FINISHED_RETAINED, E.JOIN): both(S.FINISHED_RETAINED),
    (S.FINISHED_RETAINED, E.LEAVE): both(S.FINISHED_RETAINED),
    (S.FINISHED_RETAINED, E.TAKEN_OVER): both(S.FINISHED_RETAINED, X.NOTIFY_TAKEN_OVER),
    (S.FINISHED_RETAINED, E.RETENTION_OVER): both(S.DROPPED, *DROP),
    (S.FINISHED_RETAINED, E.EVICT): both(S.LOST, *DROP, X.MARK_LOST),
    (S.FINISHED_RETAINED, E.CANCEL): both(S.FINISHED_RETAINED),
    (S.FINISHED_RETAINED, E.CLOSE): both(S.FINISHED_RETAINED, X.DISARM_TIMER),
    (S.REMOTE_FOLLOWED, E.ATTACH): both(S.REMOTE_FOLLOWED, X.NOTIFY_TAKEN_OVER),
    (S.REMOTE_FOLLOWED, E.DETACH): both(S.DROPPED, *UNFOLLOW),
    (S.REMOTE_FOLLOWED, E.TAKEN_OVER): both(S.DROPPED, X.NOTIFY_TAKEN_OVER, *UNFOLLOW),
    (S.REMOTE_FOLLOWED, E.FINISH): both(S.REMOTE_ENDED),
    (S.REMOTE_FOLLOWED, E.FAIL): both(S.REMOTE_ENDED, X.NOTIFY_FAILED),
    (S.REMOTE_FOLLOWED, E.CANCEL): both(S.REMOTE_FOLLOWED, X.CANCEL_UPSTREAM),
    (S.REMOTE_FOLLOWED, E.CLOSE): both(S.DROPPED, *UNFOLLOW),
    (S.REMOTE_ENDED, E.DETACH): both(S.DROPPED, *UNFOLLOW),
    (S.REMOTE_ENDED, E.TAKEN_OVER): both(S.DROPPED, X.NOTIFY_TAKEN_OVER, *UNFOLLOW),
    (S.REMOTE_ENDED, E.CANCEL): both(S.REMOTE_ENDED),
    (S.REMOTE_ENDED, E.CLOSE): both(S.DROPPED, *UNFOLLOW),
    (S.DROPPED, E.FINISH): both(S.DROPPED),
    (S.DROPPED, E.FAIL): both(S.DROPPED),
    (S.DROPPED, E.CANCEL): both(S.DROPPED),
    (S.DROPPED, E.DETACH): both(S.DROPPED),
    (S.DROPPED, E.LEAVE): both(S.DROPPED),
    (S.LOST, E.FINISH): both(S.LOST),
}


@pytest.mark.parametrize("pair", sorted(EXPECTED, key=lambda p: (p[0].value, p[1].value)),
                         ids=lambda p: f"{p[0].value}+{p[1].value}")
def test_every_legal_transition_has_its_rule(pair):
    resumable, unresumable = EXPECTED[pair]
    assert transition(*pair, resumable=True) == resumable
    assert transition(*pair, resumable=False) == unresumable


def test_the_table_holds_exactly_the_rules():
    assert legal_pairs() == set(EXPECTED)


@pytest.mark.parametrize("resumable", [True, False])
def test_every_other_pair_is_illegal(resumable):
    illegal = [(s, e) for s, e in itertools.product(State, Event) if (s, e) not in EXPECTED]
    assert len(illegal) > 40
    for state, event in illegal:
        with pytest.raises(IllegalTransition) as info:
            transition(state, event, resumable)
        assert (info.value.state, info.value.event) == (state, event)
        assert state.value in str(info.value) and event.value in str(info.value)


def test_leaving_the_table_always_releases_the_bytes_and_terminal_states_are_final():
    for (state, _event), outcomes in EXPECTED.items():
        for outcome in outcomes:
            if state in TERMINAL:
                assert outcome == Outcome(state), (state, outcome)
            elif outcome.state in TERMINAL:
                assert Effect.RELEASE in outcome.effects, (state, outcome)
            else:
                assert Effect.RELEASE not in outcome.effects, (state, outcome)


def _walk(events, resumable, state=State.RUNNING_DETACHED):
    effects = []
    for event in events:
        outcome = transition(state, event, resumable)
        state = outcome.state
        effects.extend(outcome.effects)
    return state, effects


def test_a_stream_resumed_within_the_grace_keeps_running_and_is_retained_after_its_finish():
    state, effects = _walk([E.ATTACH, E.DETACH, E.ATTACH, E.FINISH, E.DETACH,
                            E.RETENTION_OVER], resumable=True)
    assert state is S.DROPPED
    assert X.CANCEL_UPSTREAM not in effects
    assert effects.count(X.ARM_GRACE) == 1 and effects.count(X.ARM_RETENTION) == 1
    assert effects[-1] is X.RELEASE


def test_viewers_come_and_go_without_moving_the_stream_until_the_last_one_leaves():
    # owner attaches, two viewers join, the owner leaves, one viewer leaves (LEAVE), a new
    # owner takes the free slot (JOIN), both go (LEAVE, then the last one DETACH).
    state, effects = _walk([E.ATTACH, E.JOIN, E.JOIN, E.LEAVE, E.LEAVE, E.JOIN, E.LEAVE,
                            E.DETACH], resumable=True)
    assert state is S.RUNNING_DETACHED
    assert effects == [X.DISARM_TIMER, X.ARM_GRACE]


def test_without_grace_a_disconnect_cancels_and_the_finish_drops_the_stream():
    state, effects = _walk([E.ATTACH, E.DETACH, E.FINISH], resumable=False)
    assert state is S.DROPPED
    assert effects == [X.DISARM_TIMER, X.CANCEL_UPSTREAM, *DROP]


def test_a_followed_stream_that_fails_tells_its_attachment_then_is_released():
    state, effects = _walk([E.ATTACH, E.FAIL, E.DETACH], resumable=True,
                           state=State.REMOTE_FOLLOWED)
    assert state is S.DROPPED
    assert effects == [X.NOTIFY_TAKEN_OVER, X.NOTIFY_FAILED, *UNFOLLOW]


# ---------------------------------------------------------------------- byte accounting


class _Source:
    cancelled = False

    def cancel(self, reason="client_cancel"):
        self.cancelled = True


def _stream(max_bytes=1 << 20, keep=False) -> HubStream:
    return HubStream(key="k", id="q", alias="demo", principal="p", session_id="s",
                     source=_Source(), log=FrameLog(max_bytes=max_bytes, keep=keep),
                     principal_state=PrincipalState())


def _token(seq, text="hello"):
    return {"type": "token", "id": "q", "seq": seq, "text": text}


def test_a_stream_record_charges_exactly_what_its_log_holds_while_in_the_table():
    budget = ByteBudget(limit=1 << 20)
    stream = _stream(max_bytes=2048)
    stream.append(_token(1))                       # before it enters: not charged
    stream.enter(budget)
    assert budget.total == stream.log.bytes > 0
    for seq in range(2, 200):                      # past the log's cap: it trims itself
        stream.append(_token(seq, "x" * 20))
        assert budget.total == stream.log.bytes <= 2048
    stream.trim_through(150)
    assert budget.total == stream.log.bytes
    assert budget.peak >= 2048 - 64
    stream.release()
    assert budget.total == 0
    stream.append(_token(200))                     # a late finish of a dropped stream
    assert budget.total == 0
    stream.release()                               # releasing twice gives nothing back twice
    assert budget.total == 0


def test_two_records_share_one_budget_and_its_limit_calls_back_only_on_appends():
    over = []
    budget = ByteBudget(limit=400, on_over=lambda: over.append(budget.total))
    a, b = _stream(), _stream()
    a.enter(budget)
    b.enter(budget)
    for seq in range(1, 6):
        a.append(_token(seq))
        b.append(_token(seq))
    assert budget.total == a.log.bytes + b.log.bytes
    assert over and all(total > 400 for total in over)
    calls = len(over)
    a.trim_through(5)                              # giving back never calls back
    assert len(over) == calls
    a.release()
    b.release()
    assert budget.total == 0


def test_the_budget_refuses_to_go_negative():
    budget = ByteBudget(limit=100)
    budget.charge(10)
    with pytest.raises(AssertionError):
        budget.charge(-11)
    assert budget.total == 10


def test_every_state_of_a_local_stream_has_one_shared_state_and_followed_ones_none():
    """The one map between the lifecycle here and the record in Redis: each state of a
    stream run here is recorded as exactly one shared state; a followed stream's record is
    its owner's to write."""
    local = [s for s in State if s not in (State.REMOTE_FOLLOWED, State.REMOTE_ENDED)]
    for state in local:
        assert [sh for sh in SharedState if state in sh.owner_states] == [SharedState.of(state)]
    for state in (State.REMOTE_FOLLOWED, State.REMOTE_ENDED):
        with pytest.raises(ValueError):
            SharedState.of(state)
    assert [s.value for s in SharedState] == ["running", "finished", "lost"]  # Redis holds these


def test_what_a_follower_makes_of_each_shared_state_is_a_legal_event_of_a_followed_stream():
    assert SharedState.RUNNING.follower_event is None
    for shared in (SharedState.FINISHED, SharedState.LOST):
        event = shared.follower_event
        assert event is not None
        assert transition(State.REMOTE_FOLLOWED, event, True).state is State.REMOTE_ENDED


def test_the_lifecycle_module_is_sans_io():
    """It imports only the standard library's data tools: no asyncio, no sockets, no relay."""
    import relay.core.lifecycle

    tree = ast.parse(Path(relay.core.lifecycle.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "enum", "collections.abc", "dataclasses"}, imported
