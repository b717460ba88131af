"""Authentication (API keys, signed tokens) and the per-principal completion token budget,
against a real relay on a real socket with the real websockets client."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.core.auth import mint_token
from llm_relay_client import HandshakeFailed, RelayClient
from relay.config import RelaySettings
from relay.upstream.llm import set_demo_tps
from relay.upstream.providers import ModelRegistry, demo_spec
from relay.runtime.server import RelayServer

from .helpers import SUBPROTOCOL, Client, start_relay
from .test_core import _close_of

ROOT = Path(__file__).resolve().parents[2]
SECRET = "test-token-secret-" + "0123456789abcdef" * 4
KEY = "sk-relay-TEST-key-do-not-log-0001"
KEY2 = "sk-relay-TEST-key-do-not-log-0002"
HI = [{"role": "user", "content": "hi"}]


def label(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def hello(token: str | None = None) -> dict:
    frame: dict = {"type": "hello", "client": {"name": "tests", "version": "0"}}
    if token is not None:
        frame["token"] = token
    return frame


def auth_relay(**settings):
    settings.setdefault("auth", True)
    settings.setdefault("api_keys", [KEY])
    settings.setdefault("token_secret", SECRET)
    return start_relay(**settings)


def crafted(claims: dict, secret: str = SECRET, **kwargs) -> str:
    return jwt.encode(claims, secret, algorithm=kwargs.pop("algorithm", "HS256"), **kwargs)


async def refused(url: str, frame: dict | None, **kwargs) -> tuple[int, str, list[dict]]:
    """Send ``frame`` as the first frame; return the close code, reason and frames received."""
    got: list[dict] = []
    async with connect(url, subprotocols=[SUBPROTOCOL], **kwargs) as ws:
        if frame is not None:
            await ws.send(json.dumps(frame))
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    got.append(json.loads(await ws.recv()))
        return ws.close_code, ws.close_reason, got


async def settled(server: RelayServer) -> None:
    """Wait until the stream tasks of every session have ended (their finally has run)."""
    tasks = [t for s in server.sessions for t in s.stream_tasks()]
    if tasks:
        await asyncio.wait(tasks)


def principals(server: RelayServer) -> list[str]:
    return sorted(s.principal for s in server.sessions)


# ---------------------------------------------------------------------- API keys


async def test_bearer_header_api_key_ok_and_principal_is_key_label():
    async with auth_relay() as server:
        async with Client.connect(server.url, hello=False,
                                  additional_headers={"Authorization": f"Bearer {KEY}"}) as c:
            await c.send(hello())  # no token in hello: the header authenticates
            assert (await c.recv())["type"] == "welcome"
            assert principals(server) == [label(KEY)]
            await c.start("a", params={"max_tokens": 2})
            assert (await c.collect("a"))[-1]["status"] == "completed"


async def test_hashed_key_in_settings_ok():
    stored = "sha256:" + hashlib.sha256(KEY2.encode()).hexdigest()
    async with auth_relay(api_keys=[stored], token_secret=None) as server:
        async with Client.connect(server.url,
                                  additional_headers={"Authorization": f"Bearer {KEY2}"}) as c:
            assert c.welcome["models"] == ["demo"]
            assert principals(server) == [label(KEY2)]
        # the stored hash itself is not a key
        code, reason, got = await refused(server.url, hello(stored))
        assert (code, reason, got) == (4401, "invalid token", [])


@pytest.mark.parametrize("header", [
    "Basic dXNlcjpwYXNz", f"bearer-{KEY}", "Bearer", "Bearer wrong-key",
    f"Token {KEY}", "Bearer not.a.jwt",
])
async def test_bad_authorization_header_refused_http_401(header):
    async with auth_relay() as server:
        with pytest.raises(InvalidStatus) as info:
            async with connect(server.url, subprotocols=[SUBPROTOCOL],
                               additional_headers={"Authorization": header}):
                pass
        response = info.value.response
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert KEY.encode() not in response.body


async def test_authorization_header_sent_twice_refused_http_401():
    async with auth_relay() as server:
        with pytest.raises(InvalidStatus) as info:
            async with connect(server.url, subprotocols=[SUBPROTOCOL], additional_headers=[
                    ("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {KEY}")]):
                pass
    assert info.value.response.status_code == 401


async def test_expired_token_in_header_refused_http_401_saying_expired():
    now = int(time.time())
    token = crafted({"sub": "alice", "iat": now - 100, "exp": now - 10})
    async with auth_relay() as server:
        with pytest.raises(InvalidStatus) as info:
            async with connect(server.url, subprotocols=[SUBPROTOCOL],
                               additional_headers={"Authorization": f"Bearer {token}"}):
                pass
    assert info.value.response.status_code == 401
    assert info.value.response.body == b"token expired\n"


async def test_hello_token_api_key_ok():
    async with auth_relay() as server:
        async with Client.connect(server.url, hello=False) as c:
            await c.send(hello(KEY))
            assert (await c.recv())["type"] == "welcome"
            assert principals(server) == [label(KEY)]


async def test_auth_off_ignores_credentials_and_principal_is_address():
    async with start_relay() as server:
        async with Client.connect(server.url,
                                  additional_headers={"Authorization": "Basic nonsense"}) as c:
            assert c.welcome["type"] == "welcome"
            assert principals(server) == ["ip:127.0.0.1"]


# ---------------------------------------------------------------------- refusals (4401)


async def test_missing_token_closes_4401_and_nothing_served():
    async with auth_relay() as server:
        code, reason, got = await refused(server.url, hello())
        assert (code, reason, got) == (4401, "missing token", [])
        # a start sent right behind the hello is not served either
        async with connect(server.url, subprotocols=[SUBPROTOCOL]) as ws:
            await ws.send(json.dumps(hello()))
            await ws.send(json.dumps({"type": "start", "id": "x", "model": "demo",
                                      "messages": HI}))
            code, reason = await _close_of(ws)
        assert (code, reason) == (4401, "missing token")


def _invalid_tokens() -> dict[str, str]:
    now = int(time.time())
    good = {"sub": "alice", "iat": now, "exp": now + 300}
    return {
        "not a key": "definitely-not-a-key",
        "wrong secret": crafted(good, secret="another-secret-" + "x" * 64),
        "no sub": crafted({"iat": now, "exp": now + 300}),
        "no exp": crafted({"sub": "alice", "iat": now}),
        "empty sub": crafted({**good, "sub": ""}),
        "models not a list": crafted({**good, "models": "demo"}),
        "max_streams zero": crafted({**good, "max_streams": 0}),
        "alg none": crafted(good, secret=None, algorithm="none"),
        "HS512": crafted(good, algorithm="HS512"),
        "tampered": mint_token(SECRET, "alice", 300)[:-2] + "xx",
    }


@pytest.mark.parametrize("case", list(_invalid_tokens()))
async def test_invalid_token_closes_4401_invalid_token(case):
    token = _invalid_tokens()[case]
    async with auth_relay() as server:
        code, reason, got = await refused(server.url, hello(token))
    assert (code, reason, got) == (4401, "invalid token", [])


async def test_expired_token_closes_4401_token_expired():
    now = int(time.time())
    token = crafted({"sub": "alice", "iat": now - 100, "exp": now - 1})
    async with auth_relay() as server:
        code, reason, got = await refused(server.url, hello(token))
    assert (code, reason, got) == (4401, "token expired", [])


def _bad_time_claims() -> dict[str, dict]:
    now = int(time.time())
    good = {"sub": "alice", "iat": now, "exp": now + 300}
    return {
        # A NaN exp never expired (every comparison with NaN is false); inf and 1e30 neither.
        "exp NaN": {**good, "exp": float("nan")},
        "exp inf": {**good, "exp": float("inf")},
        "exp 1e30": {**good, "exp": 1e30},
        "exp 1e30 as an integer": {**good, "exp": 10 ** 30},
        "exp a float": {**good, "exp": now + 300.5},
        "exp a string": {**good, "exp": str(now + 300)},
        "exp negative": {**good, "exp": -1},
        "nbf NaN": {**good, "nbf": float("nan")},
        "nbf -inf": {**good, "nbf": float("-inf")},
        "nbf 1e30": {**good, "nbf": 1e30},
        "nbf a float": {**good, "nbf": now - 10.5},
        "iat inf": {**good, "iat": float("inf")},
    }


@pytest.mark.parametrize("case", list(_bad_time_claims()))
async def test_time_claims_must_be_integer_unix_seconds_else_invalid_token(case):
    token = crafted(_bad_time_claims()[case])
    async with auth_relay() as server:
        code, reason, got = await refused(server.url, hello(token))
        assert (code, reason, got) == (4401, "invalid token", [])
        with pytest.raises(InvalidStatus) as info:  # the same in the Authorization header
            async with connect(server.url, subprotocols=[SUBPROTOCOL],
                               additional_headers={"Authorization": f"Bearer {token}"}):
                pass
        assert info.value.response.status_code == 401
        assert info.value.response.body == b"invalid token\n"


async def test_nbf_in_the_future_is_not_yet_valid_and_a_past_nbf_is_accepted():
    now = int(time.time())
    early = crafted({"sub": "alice", "iat": now, "nbf": now + 600, "exp": now + 900})
    ready = crafted({"sub": "alice", "iat": now - 60, "nbf": now - 30, "exp": now + 300})
    async with auth_relay() as server:
        code, reason, got = await refused(server.url, hello(early))
        assert (code, reason, got) == (4401, "token not yet valid", [])
        async with Client.connect(server.url, hello=False) as c:
            await c.send(hello(ready))
            assert (await c.recv())["type"] == "welcome"
            assert principals(server) == ["jwt:alice"]


# ---------------------------------------------------------------------- signed tokens


async def test_mint_token_claims_and_accepted_with_sub_as_principal():
    token = mint_token(SECRET, "alice", 300, models=["demo"], max_streams=3)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 300
    assert (claims["models"], claims["max_streams"]) == (["demo"], 3)
    plain = jwt.decode(mint_token(SECRET, "bob", 60), SECRET, algorithms=["HS256"])
    assert set(plain) == {"sub", "iat", "exp"}  # optional claims only when given
    async with auth_relay(api_keys=[]) as server:
        async with Client.connect(server.url, hello=False) as c:
            await c.send(hello(token))
            welcome = await c.recv()
            assert welcome["type"] == "welcome" and welcome["limits"]["max_streams"] == 3
            assert principals(server) == ["jwt:alice"]
            await c.start("a", params={"max_tokens": 2})
            assert (await c.collect("a"))[-1]["status"] == "completed"


def _env(**extra: str) -> dict:
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1",
            **extra}


async def test_cli_token_mint_prints_a_jwt_the_relay_accepts():
    out = subprocess.run(
        [sys.executable, "-m", "relay", "token", "mint", "--sub", "carol", "--ttl", "120",
         "--models", "demo,other", "--max-streams", "2"],
        capture_output=True, text=True, env=_env(RELAY_TOKEN_SECRET=SECRET), cwd=ROOT,
        timeout=60)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "carol" and claims["exp"] - claims["iat"] == 120
    assert claims["models"] == ["demo", "other"] and claims["max_streams"] == 2
    async with auth_relay() as server:
        async with Client.connect(server.url, hello=False) as c:
            await c.send(hello(token))
            assert (await c.recv())["models"] == ["demo"]
            assert principals(server) == ["jwt:carol"]


def test_cli_token_mint_secret_flag_no_litellm_and_no_secret_is_an_error():
    code = ("import sys, runpy; sys.argv=['relay','token','mint','--sub','dan','--secret',"
            f"{SECRET!r}]\n"
            "try:\n    runpy.run_module('relay', run_name='__main__')\n"
            "except SystemExit as e: assert e.code == 0, e.code\n"
            "assert 'litellm' not in sys.modules, 'litellm imported by token mint'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == "dan"
    env = _env()
    env.pop("RELAY_TOKEN_SECRET", None)
    out = subprocess.run([sys.executable, "-m", "relay", "token", "mint", "--sub", "x"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "RELAY_TOKEN_SECRET" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_auth_without_credentials_is_a_clear_startup_error():
    env = _env()
    for name in ("RELAY_API_KEYS", "RELAY_TOKEN_SECRET"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-m", "relay", "serve", "--auth", "--port", "0"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert "auth is on but no credentials are configured" in out.stderr
    assert "Traceback" not in out.stderr


def _two_alias_registry() -> ModelRegistry:
    set_demo_tps(0)
    demo = demo_spec()
    return ModelRegistry([demo, dataclasses.replace(demo, alias="other")])


async def test_models_claim_filters_welcome_and_other_alias_is_unknown_model():
    token = mint_token(SECRET, "alice", 300, models=["demo"])
    async with auth_relay(registry=_two_alias_registry()) as server:
        async with Client.connect(server.url, hello=False) as c:
            await c.send(hello(KEY))
            assert (await c.recv())["models"] == ["demo", "other"]  # API key: every alias
        async with Client.connect(server.url, hello=False) as c:
            await c.send(hello(token))
            assert (await c.recv())["models"] == ["demo"]
            await c.start("o", model="other")
            forbidden = await c.next_for("o")
            await c.start("n", model="nope")
            missing = await c.next_for("n")
            assert forbidden["code"] == missing["code"] == "unknown_model"
            assert forbidden["message"].replace("'other'", "M") == \
                missing["message"].replace("'nope'", "M")
            assert "other" not in forbidden["message"].replace("'other'", "")
            await c.start("d", params={"max_tokens": 1})
            assert (await c.collect("d"))[-1]["status"] == "completed"


async def test_max_streams_claim_caps_streams_of_the_connection_and_principal():
    token = mint_token(SECRET, "alice", 300, max_streams=1)
    async with auth_relay(demo_tps=0.5) as server:
        async with Client.connect(server.url, hello=False) as a, \
                Client.connect(server.url, hello=False) as b:
            await a.send(hello(token))
            assert (await a.recv())["limits"]["max_streams"] == 1
            await b.send(hello(token))
            await b.recv()
            await a.start("1")
            assert (await a.next_for("1"))["type"] == "started"
            await a.start("2")
            err = await a.next_for("2")
            assert (err["code"], err["id"]) == ("too_many_streams", "2")
            await b.start("3")  # same principal, other connection
            assert (await b.next_for("3"))["code"] == "too_many_streams"
            await a.send({"type": "cancel", "id": "1"})
            assert (await a.collect("1"))[-1]["status"] == "cancelled"


async def test_sub_is_the_principal_for_the_connection_limit():
    alice = mint_token(SECRET, "alice", 300)
    async with auth_relay(max_connections_per_principal=1) as server:
        async with Client.connect(server.url, hello=False) as a1, \
                Client.connect(server.url, hello=False) as b1:
            await a1.send(hello(alice))
            assert (await a1.recv())["type"] == "welcome"
            await b1.send(hello(mint_token(SECRET, "bob", 300)))  # same address, other sub
            assert (await b1.recv())["type"] == "welcome"
            assert principals(server) == ["jwt:alice", "jwt:bob"]
            code, reason, got = await refused(server.url, hello(alice))
            assert (code, got) == (4429, []) and "principal" in reason
            await a1.send({"type": "ping"})
            assert (await a1.recv())["type"] == "pong"
        async with Client.connect(server.url, hello=False) as a2:  # slot released
            await a2.send(hello(alice))
            assert (await a2.recv())["type"] == "welcome"


async def test_token_expiring_while_streaming_next_start_closes_4401_after_running_finish():
    token = mint_token(SECRET, "alice", 300)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    async with auth_relay(demo_tps=20) as server:
        now = [time.time()]
        server.auth.clock = lambda: now[0]
        async with Client.connect(server.url, hello=False) as c:
            await c.send(hello(token))
            assert (await c.recv())["type"] == "welcome"
            await c.start("a", params={"max_tokens": 6})
            assert (await c.next_for("a"))["type"] == "started"
            assert (await c.next_for("a"))["type"] == "token"
            now[0] = claims["exp"] + 1  # the token expires while "a" runs
            await c.start("b")
            await c.send({"type": "ping", "data": 7})
            got: list[dict] = []
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(10):
                    while True:
                        got.append(await c.recv())
            assert (c.ws.close_code, c.ws.close_reason) == (4401, "token expired")
        assert not [f for f in got if f.get("id") == "b"]  # no started, no error
        finish = [f for f in got if f["type"] == "finish"]
        assert len(finish) == 1 and finish[0]["id"] == "a"
        assert (finish[0]["status"], finish[0]["reason"]) == ("completed", "length")
        assert {"type": "pong", "data": 7} in got  # the connection kept answering meanwhile


async def test_api_key_connections_never_expire():
    async with auth_relay() as server:
        server.auth.clock = lambda: time.time() + 10 * 365 * 86400
        async with Client.connect(server.url, hello=False) as c:
            await c.send(hello(KEY))
            await c.recv()
            await c.start("a", params={"max_tokens": 1})
            assert (await c.collect("a"))[-1]["status"] == "completed"


# ---------------------------------------------------------------------- Python client


async def test_client_token_callable_is_called_on_each_connect():
    calls: list[str] = []

    def sync_source() -> str:
        calls.append("sync")
        return mint_token(SECRET, "erin", 60)

    async def async_source() -> str:
        calls.append("async")
        return mint_token(SECRET, "frank", 60)

    async with auth_relay() as server:
        async with RelayClient(server.url, token=sync_source) as c:
            assert principals(server) == ["jwt:erin"]
            assert (await c.complete("demo", HI, max_tokens=2)).status == "completed"
        async with RelayClient(server.url, token=async_source) as c:
            assert principals(server) == ["jwt:frank"]
        async with RelayClient(server.url, token=sync_source) as c:  # a new connect: called again
            assert c.models == ["demo"]
        assert calls == ["sync", "async", "sync"]
        async with RelayClient(server.url, token=KEY) as c:  # a plain string still works
            assert principals(server) == [label(KEY)]
        with pytest.raises(HandshakeFailed, match="missing token"):
            async with RelayClient(server.url):
                pass


async def test_a_token_whose_sub_looks_like_a_key_label_is_not_that_keys_principal():
    # Principals are namespaced by credential kind: a JWT with sub "key:<8 hex>" is
    # "jwt:key:<8 hex>", so it can neither resume the key's stream nor use up its limits.
    forged = mint_token(SECRET, label(KEY), 300)
    async with auth_relay(detach_grace=5, demo_tps=2, max_connections_per_principal=1,
                          max_streams_per_principal=1) as server:
        async with Client.connect(server.url, hello=False) as owner, \
                Client.connect(server.url, hello=False) as intruder:
            await owner.send(hello(KEY))
            assert (await owner.recv())["type"] == "welcome"
            await owner.start("q1", content="a long answer please")
            started = await owner.next_for("q1")
            assert started["type"] == "started"
            # Same-looking principal, other credential kind: its own connection slot ...
            await intruder.send(hello(forged))
            assert (await intruder.recv())["type"] == "welcome"
            assert principals(server) == ["jwt:" + label(KEY), label(KEY)]
            # ... no access to the key's stream (the answer for any foreign key) ...
            await intruder.send({"type": "resume", "stream_key": started["stream_key"],
                                 "after_seq": 0, "id": "q1"})
            err = await intruder.next_for("q1")
            assert (err["type"], err["code"]) == ("error", "unknown_stream")
            # ... and its own stream count (the key already runs its one stream).
            await intruder.start("mine", params={"max_tokens": 1})
            assert (await intruder.collect("mine"))[-1]["status"] == "completed"
            await owner.send({"type": "cancel", "id": "q1"})
            assert (await owner.collect("q1"))[-1]["status"] == "cancelled"


# ---------------------------------------------------------------------- token budget


async def test_completion_token_budget_rate_limits_principal_others_unaffected():
    async with auth_relay(api_keys=[KEY, KEY2], completion_token_budget_per_hour=5) as server:
        async with Client.connect(server.url, hello=False) as a:
            await a.send(hello(KEY))
            await a.recv()
            for sid in ("1", "2"):  # 3 + 3 tokens: the second start still had budget left
                await a.start(sid, params={"max_tokens": 3})
                frames = await a.collect(sid)
                assert frames[-1]["usage"]["completion_tokens"] == 3
                await settled(server)
            await a.start("3", params={"max_tokens": 1})
            err = await a.next_for("3")
            assert (err["code"], err["ref"], err["id"]) == ("rate_limited", "start", "3")
            assert 3500 < err["retry_after"] <= 3600
        async with Client.connect(server.url, hello=False) as b:  # another principal
            await b.send(hello(KEY2))
            await b.recv()
            await b.start("x", params={"max_tokens": 1})
            assert (await b.collect("x"))[-1]["status"] == "completed"
        async with Client.connect(server.url, hello=False) as a2:  # reconnecting: same budget
            await a2.send(hello(KEY))
            await a2.recv()
            await a2.start("4", params={"max_tokens": 1})
            assert (await a2.next_for("4"))["code"] == "rate_limited"


def test_completion_budget_sliding_window_retry_after():
    from relay.core.limits import CompletionBudget

    now = [1000.0]
    budget = CompletionBudget(10, window=3600, clock=lambda: now[0])
    assert budget.retry_after() == 0
    budget.charge(6)
    now[0] += 100
    budget.charge(6)
    assert budget.used == 12
    assert budget.retry_after() == 3500  # the first charge leaves the window then
    now[0] += 3500
    assert budget.used == 6 and budget.retry_after() == 0 and not budget.idle
    now[0] += 100
    assert budget.idle


# ---------------------------------------------------------------------- secrets


async def test_secrets_never_in_logs_frames_or_repr(caplog):
    caplog.set_level(logging.DEBUG, logger="relay")
    token = mint_token(SECRET, "alice", 300)
    now = int(time.time())
    expired = crafted({"sub": "alice", "iat": now - 100, "exp": now - 1})
    frames: list[dict] = []
    async with auth_relay(completion_token_budget_per_hour=1) as server:
        async with Client.connect(server.url,
                                  additional_headers={"Authorization": f"Bearer {KEY}"}) as c:
            await c.start("a", params={"max_tokens": 2})
            frames += await c.collect("a")
            await settled(server)
            await c.start("b")
            frames.append(await c.next_for("b"))
            await c.start("c", model="nope")
            frames.append(await c.next_for("c"))
        async with Client.connect(server.url, hello=False) as c:
            await c.send(hello(token))
            frames.append(await c.recv())
        for bad in (KEY + "x", expired, None):
            frames += (await refused(server.url, hello(bad)))[2]
        with pytest.raises(InvalidStatus):
            async with connect(server.url, subprotocols=[SUBPROTOCOL],
                               additional_headers={"Authorization": f"Bearer {KEY}x"}):
                pass
        reprs = repr(server.settings) + repr(server.auth)
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert label(KEY) in logged and "alice" in logged  # principals are logged ...
    for secret in (KEY, SECRET, token, expired):  # ... credentials are not
        assert secret not in logged
        assert secret not in json.dumps(frames)
    for secret in (KEY, SECRET):
        assert secret not in reprs
    assert "rate_limited" in json.dumps(frames)


def test_settings_from_env_and_invalid_key_error_does_not_echo_it(monkeypatch):
    monkeypatch.setenv("RELAY_AUTH", "true")
    monkeypatch.setenv("RELAY_API_KEYS", json.dumps([KEY]))
    monkeypatch.setenv("RELAY_TOKEN_SECRET", SECRET)
    monkeypatch.setenv("RELAY_COMPLETION_TOKEN_BUDGET_PER_HOUR", "1000")
    settings = RelaySettings()
    assert settings.auth and settings.api_keys == [KEY]
    assert settings.token_secret.get_secret_value() == SECRET
    assert settings.completion_token_budget_per_hour == 1000
    assert SECRET not in repr(settings) and KEY not in repr(settings)
    with pytest.raises(ValueError) as info:
        RelaySettings(api_keys=[KEY, "sha256:" + KEY])
    assert KEY not in str(info.value) and "64 hex digits" in str(info.value)


async def test_serve_flags_auth_api_key_and_token_budget():
    env = _env(RELAY_TOKEN_SECRET=SECRET)
    env.pop("RELAY_API_KEYS", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--port", "0", "--demo-tps", "0", "--auth",
        "--api-key", KEY, "--token-budget", "2", stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        url = re.search(r"(ws://\S+/ws)", line).group(1)
        code, reason, _ = await refused(url, hello())
        assert (code, reason) == (4401, "missing token")
        async with Client.connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as c:
            await c.start("a", params={"max_tokens": 2})
            assert (await c.collect("a"))[-1]["usage"]["completion_tokens"] == 2
        async with Client.connect(url, hello=False) as c:  # secret from the environment
            await c.send(hello(mint_token(SECRET, "gina", 60)))
            assert (await c.recv())["type"] == "welcome"
        async with Client.connect(url, hello=False) as c:  # same key: budget used up
            await c.send(hello(KEY))
            await c.recv()
            await c.start("b")
            assert (await c.next_for("b"))["code"] == "rate_limited"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        stderr = (await proc.stderr.read()).decode()
        assert KEY not in stderr and SECRET not in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
