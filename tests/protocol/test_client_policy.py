"""llm_relay_protocol.client_policy, pure: the shared JSON vectors (tests/vectors/client_policy.json)
run against the Python policy, the generated JS tables are fresh, and the policy's own
contracts (bounded dedupe state, schema-valid local finish, backoff bounds).

relay-client.js runs the same vectors in Chromium (tests/browser/test_client_policy_js.py),
so a vector that passes here and there means both clients decide the same."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from llm_relay_protocol import Finish, decode_server_frame
from llm_relay_protocol import client_policy as cp
from llm_relay_protocol.client_policy import (
    BACKOFF,
    MAX_RECONNECT_ATTEMPTS,
    CancelAction,
    ClientStreamTracker,
    FrameAction,
    ReconnectSchedule,
    StreamFailure,
    close_decision,
    local_cancel_finish,
)

ROOT = Path(__file__).resolve().parents[2]
VECTORS = json.loads((ROOT / "tests" / "vectors" / "client_policy.json").read_text("utf-8"))
SCENARIOS = VECTORS["scenarios"]


class PolicyDriver:
    """The smallest client around the policy: what the vectors' steps do to a client that
    carries out exactly the policy's decisions (clients/python/llm_relay_client/client.py does the same with sockets).
    Records what the vectors' ``expect`` describes."""

    def __init__(self, token: str) -> None:
        self.tracker = ClientStreamTracker()
        self.schedule = ReconnectSchedule()
        self.token_function = token == "function"
        self.state = "connecting"
        self.welcomed = False
        self.grace: float = 0  # limits.detach_grace of the last welcome
        self.sent: list[list[dict[str, Any]]] = []
        self.events: dict[str, list[str]] = defaultdict(list)
        self.ends: dict[str, dict[str, Any]] = {}
        self.decisions: list[dict[str, Any]] = []

    def step(self, step: dict[str, Any]) -> None:
        if "connect" in step:
            self.connect(step["connect"])
        elif step.get("app") == "watch":
            self.app_watch(step["id"], step["stream_key"], step.get("after_seq", 0))
        elif "app" in step:
            getattr(self, f"app_{step['app']}")(step["id"])
        elif "recv" in step:
            self.recv(step["recv"])
        elif "close" in step:
            self.close(step["close"]["code"], step["close"]["reason"])
        else:  # pragma: no cover - a malformed vector
            raise AssertionError(f"unknown step {step}")

    def send(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "start":
            frame = {"type": "start", "id": frame["id"]}
        self.sent[-1].append(frame)

    def connect(self, spec: dict[str, Any]) -> None:
        assert self.state in ("connecting", "reconnecting"), self.state
        self.sent.append([])
        self.welcomed = spec.get("welcome", True)
        if not self.welcomed:
            return
        self.grace = spec["detach_grace"]
        self.schedule.welcomed()
        self.state = "open"
        outcome = self.tracker.welcomed(self.grace)
        self.fail(outcome.failed)
        for frame in outcome.resumes:
            self.send(frame)
        for sid in outcome.starts:
            self.tracker.start_sent(sid)
            self.send({"type": "start", "id": sid})

    def app_start(self, sid: str) -> None:
        self.tracker.add(sid)
        self.events[sid]  # noqa: B018 - a stream with no events is still reported
        if self.state == "open":
            self.tracker.start_sent(sid)
            self.send({"type": "start", "id": sid})

    def app_watch(self, sid: str, stream_key: str, after_seq: int) -> None:
        frame = self.tracker.watch(sid, stream_key, after_seq)
        self.events[sid]  # noqa: B018 - a stream with no events is still reported
        if self.state == "open":
            self.send(frame)

    def app_cancel(self, sid: str) -> None:
        action = self.tracker.cancel(sid)
        if action is CancelAction.LOCAL_FINISH:
            finish = local_cancel_finish(sid)
            self.events[sid].append(f"finish:{finish['seq']}")
            self.ends[sid] = {"finish": finish["status"], "reason": finish["reason"]}
        elif action is CancelAction.SEND:
            self.send({"type": "cancel", "id": sid})

    def recv(self, frame: dict[str, Any]) -> None:
        decision = self.tracker.frame(frame)
        if decision.action in (FrameAction.DELIVER, FrameAction.END):
            self.events[decision.id].append(f"{frame['type']}:{frame['seq']}")
            if decision.action is FrameAction.END:
                self.ends[decision.id] = {"finish": frame["status"], "reason": frame["reason"]}
        elif decision.action is FrameAction.FAIL:
            self.fail(decision.failures)
        elif decision.action is FrameAction.RESUMED and decision.send_cancel:
            self.send({"type": "cancel", "id": decision.id})

    def close(self, code: int, reason: str) -> None:
        decision = close_decision(code, reason, welcomed=self.welcomed,
                                  token_refreshable=self.token_function)
        retry = decision.retry and self.schedule.next_delay(0.5) is not None
        self.decisions.append({"code": code, "retry": retry})
        if self.welcomed or not decision.retry:
            self.fail(self.tracker.connection_lost(decision, self.grace).failed)
        if retry:
            self.state = "reconnecting"
        else:
            self.fail(self.tracker.fail_all(cp.CONNECTION_LOST, "gave up", code))
            self.state = "closed"
        self.welcomed = False

    def fail(self, failures: tuple[StreamFailure, ...]) -> None:
        for f in failures:
            close_code = None if f.kind == "rejected" else f.close_code
            self.ends[f.id] = {"error": f.code, "close_code": close_code}

    def outcome(self) -> dict[str, Any]:
        return {"decisions": self.decisions, "sent": self.sent,
                "streams": {sid: {"events": evs, "end": self.ends.get(sid)}
                            for sid, evs in self.events.items()},
                "state": self.state, "connections": len(self.sent)}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_vector_scenarios_against_the_python_policy(scenario):
    driver = PolicyDriver(scenario["token"])
    for step in scenario["steps"]:
        driver.step(step)
    assert driver.outcome() == scenario["expect"], scenario["about"]


@pytest.mark.parametrize("row", VECTORS["close_decisions"],
                         ids=[f"{r['code']}-{r['reason'] or 'none'}-w{int(r['welcomed'])}"
                              f"-f{int(r['token_function'])}" for r in VECTORS["close_decisions"]])
def test_vector_close_decisions(row):
    decision = close_decision(row["code"], row["reason"], welcomed=row["welcomed"],
                              token_refreshable=row["token_function"])
    assert decision.retry is row["retry"]
    assert decision.resend_unanswered_starts is (row["retry"] and row["code"] == 4401)


def test_vector_backoff_schedule():
    assert VECTORS["max_reconnect_attempts"] == MAX_RECONNECT_ATTEMPTS == BACKOFF.max_attempts
    for row in VECTORS["backoff"]:
        delay = BACKOFF.delay(row["attempt"], row["r"]) * 1000
        assert delay == pytest.approx(row["delay_ms"]), row


def test_reconnect_schedule_counts_attempts_and_restarts_after_a_welcome():
    schedule = ReconnectSchedule()
    delays = [schedule.next_delay(0.0) for _ in range(MAX_RECONNECT_ATTEMPTS)]
    assert delays == [BACKOFF.delay_bounds(n)[0] for n in range(MAX_RECONNECT_ATTEMPTS)]
    assert schedule.next_delay(0.0) is None
    schedule.welcomed()
    assert schedule.next_delay(0.0) == BACKOFF.delay_bounds(0)[0]
    unlimited = ReconnectSchedule(max_attempts=None)
    assert all(unlimited.next_delay(0.99) is not None for _ in range(1000))
    assert BACKOFF.delay_bounds(10**6) == (BACKOFF.cap * 0.5, BACKOFF.cap)  # no overflow


def test_every_vector_is_distinct_and_covers_each_issue_item():
    names = [s["name"] for s in SCENARIOS]
    assert len(names) == len(set(names))
    codes = {row["code"] for row in VECTORS["close_decisions"]}
    # The divergences the issue lists: 1005, 4401 "token expired", the attempt limit.
    assert {1005, 4401} <= codes
    assert {"eight_failed_attempts_give_up", "seven_failed_attempts_then_a_welcome_resumes",
            "cancel_before_start_left_ends_with_a_local_finish",
            "token_expired_with_token_function_refreshes_and_resends_unanswered_starts",
            "refused_fresh_token_is_final", "1005_is_retried_like_a_drop"} <= set(names)


def test_local_cancel_finish_is_a_valid_finish_frame():
    frame = local_cancel_finish("s-1")
    decoded = decode_server_frame(json.dumps(frame))
    assert isinstance(decoded, Finish)
    assert (decoded.status, decoded.reason, decoded.usage.total_tokens,
            decoded.usage.estimated) == ("cancelled", "client_cancel", 0, True)
    with pytest.raises(ValueError):  # what relay-client.js used to fabricate
        decode_server_frame(json.dumps({**frame, "usage": None}))


def test_dedupe_state_is_one_int_per_stream_whatever_the_stream_length():
    tracker = ClientStreamTracker()
    tracker.add("a")
    tracker.start_sent("a")
    for seq in range(10_000):
        assert tracker.frame({"type": "token", "id": "a", "seq": seq, "text": "x"}).action \
            is FrameAction.DELIVER
        assert tracker.frame({"type": "token", "id": "a", "seq": seq, "text": "x"}).action \
            is FrameAction.DUPLICATE
    assert tracker.last_seq("a") == 9_999
    assert vars(tracker.streams["a"]).keys() == {"id", "phase", "stream_key", "last_seq",
                                                 "cancel_requested", "resumes"}
    assert tracker.frame({"type": "finish", "id": "a", "seq": 10_000, "status": "completed",
                          "usage": {}}).action is FrameAction.END
    assert tracker.streams == {}  # an ended stream leaves nothing behind


def test_tracker_refuses_a_live_duplicate_id_and_ignores_booleans_as_seq():
    tracker = ClientStreamTracker()
    tracker.add("a")
    with pytest.raises(ValueError):
        tracker.add("a")
    tracker.start_sent("a")
    assert tracker.frame({"type": "token", "id": "a", "seq": True}).action is FrameAction.DELIVER
    assert tracker.last_seq("a") == -1


def test_generated_js_tables_are_fresh():
    committed = (ROOT / cp.JS_MODULE_PATH).read_text("utf-8")
    assert committed == cp.render_js_module(), (
        f"{cp.JS_MODULE_PATH} is stale: run `python -m llm_relay_protocol.client_policy --write`")
    body = committed.split("Object.freeze(", 1)[1].rsplit(");", 1)[0]
    assert json.loads(body) == cp.policy_tables()


def test_main_writes_and_prints(tmp_path, capsys):
    (tmp_path / cp.JS_MODULE_PATH).parent.mkdir(parents=True)
    assert cp.main(["--write", str(tmp_path)]) == 0
    assert (tmp_path / cp.JS_MODULE_PATH).read_text("utf-8") == cp.render_js_module()
    assert cp.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out) == cp.policy_tables()
    assert cp.main([]) == 2
    assert sys.modules["llm_relay_protocol.client_policy"] is cp
