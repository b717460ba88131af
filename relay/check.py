"""``relay check --config FILE [--probe]``: what each model alias of a config would do, before
the relay serves it (and, with ``--probe``, what the provider answers).

Per alias, one line: the path (fast or LiteLLM) and its reason, the endpoint URL, and whether
the key variable is set (its name, never its value). ``--probe`` then makes one request of
at most one token per alias, through exactly the code a client's ``start`` runs
(``ModelSpec.streamer``), and says in one line what came back, as LiteLLM proxy's health
check does. An alias is usable when its request builds, its key (or Azure token) variable is
set and, with ``--probe``, the probe completed.

The endpoint of a fast-path alias is the URL the fast path builds for a request
(``FastRoute.build_request``); of a LiteLLM-path alias, its ``api_base`` or the base
LiteLLM resolves for the provider (LiteLLM appends the provider's path).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from relay.upstream.llm import DEMO_PROVIDER
from relay.upstream.providers import ModelSpec

__all__ = ["AliasReport", "check_aliases", "describe_alias", "probe_alias"]

#: The probe's request: one short user message, at most one token.
PROBE_MESSAGES = [{"role": "user", "content": "Reply with OK."}]
#: Stands in for an unset key while the URL is built (it is never sent nor printed).
_PLACEHOLDER_KEY = "relay-check-placeholder-key"


@dataclass
class AliasReport:
    alias: str
    path: str
    reason: str
    endpoint: str
    key_status: str     # "KEY_VAR set", "KEY_VAR NOT SET", "no key variable configured"
    usable: bool
    problem: str | None = None
    probe: str | None = None

    def lines(self) -> list[str]:
        out = [f"{self.alias}: {self.path} path ({self.reason}); endpoint {self.endpoint}; "
               f"{self.key_status}"]
        if self.problem:
            out.append(f"  problem: {self.problem}")
        if self.probe:
            out.append(f"  probe: {self.probe}")
        return out


def _key_status(spec: ModelSpec) -> tuple[str, bool]:
    """What the alias's credential variable says (never its value), and whether it is set."""
    name = spec.azure_ad_token_env or spec.api_key_env
    if name is None:
        if spec.api_base is not None:
            return "no key variable configured (a local server needs none)", True
        return ("no key variable configured (LiteLLM uses the provider's default variable, "
                "if set)"), True
    kind = "Azure AD token" if spec.azure_ad_token_env else "key"
    if os.environ.get(name):
        return f"{kind} {name} set", True
    return f"{kind} {name} NOT SET", False


def describe_alias(spec: ModelSpec) -> AliasReport:
    """The report of one alias without contacting anyone."""
    choice = spec.path
    if spec.model.startswith(f"{DEMO_PROVIDER}/"):
        return AliasReport(spec.alias, choice.path, choice.reason,
                           "embedded demo model (no network)", "no key needed", True)
    key, key_ok = _key_status(spec)
    report = AliasReport(spec.alias, choice.path, choice.reason, "", key, key_ok)
    if not key_ok:
        report.problem = "the key variable is not set: every request would fail"
    if choice.route is not None:
        streamer = spec.streamer()
        # The kwargs a client's start sends (EventStreamer builds them), one token asked.
        kwargs = streamer._request_kwargs(PROBE_MESSAGES, None, None,
                                          spec.request_params({"max_tokens": 1}))
        # No key variable named: the request carries what LiteLLM finds in the provider's
        # default variable (built as is, to see whether there is one).
        default_key = spec.api_key_env is None and spec.azure_ad_token_env is None \
            and spec.api_base is None
        if not default_key:
            kwargs.setdefault("api_key", _PLACEHOLDER_KEY)
        if kwargs.get("azure_ad_token") is None:
            kwargs.pop("azure_ad_token", None)
        try:
            request = choice.route.build_request(kwargs)
            url, headers = request.url, request.headers
        except Exception as exc:
            report.endpoint = "(none)"
            report.usable = False
            report.problem = f"its request cannot be built: {type(exc).__name__}: {exc}"
            return report
        report.endpoint = f"POST {url}"
        if default_key and not _has_credential(headers):
            report.usable = False
            report.key_status = ("no key variable configured, and the provider's default "
                                 "one is unset")
            report.problem = "no credential: name the key's variable with api_key_env"
        elif default_key:
            report.key_status = "no key variable configured; the provider's default one is set"
        route = choice.route
        if route.provider not in ("openai", "custom_openai") and \
                url.startswith("https://api.openai.com/"):
            # LiteLLM's fallback base for a provider that has none (hosted_vllm without
            # api_base or HOSTED_VLLM_API_BASE): both paths would send it to OpenAI.
            report.usable = False
            report.problem = (f"provider {route.provider} has no default endpoint: set "
                              "api_base (requests would go to api.openai.com)")
        return report
    report.endpoint = _litellm_endpoint(spec)
    return report


def _has_credential(headers: dict) -> bool:
    """Whether built request headers carry a key (``Bearer None``: LiteLLM found none)."""
    for name, value in headers.items():
        if name.lower() in ("authorization", "x-api-key", "api-key"):
            value = str(value)
            if value and value not in ("None", "Bearer None", "Bearer "):
                return True
    return False


def _litellm_endpoint(spec: ModelSpec) -> str:
    if spec.api_base:
        return f"{spec.api_base} (LiteLLM appends the provider's path)"
    from relay.upstream.llm import get_litellm

    try:
        _name, provider, _key, base = get_litellm().get_llm_provider(spec.model)
    except Exception:
        return "(LiteLLM does not know the provider)"
    if base:
        return f"{base} (LiteLLM appends the provider's path)"
    return f"LiteLLM's default endpoint for provider {provider}"


async def probe_alias(spec: ModelSpec, timeout: float) -> tuple[bool, str]:
    """One request of at most one token through the alias's real streamer: (completed?, what
    came back in one line)."""
    from relay.upstream.event_streamer import StreamEnd, TextDelta, Timeouts

    streamer = spec.streamer()
    streamer.timeouts = Timeouts(timeout, timeout, timeout)
    started = time.monotonic()
    text: list[str] = []
    end = None
    params = spec.request_params({"max_tokens": 1})
    async for event in streamer.events(PROBE_MESSAGES, **params):
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, StreamEnd):
            end = event
    elapsed = time.monotonic() - started
    path = streamer.path_taken or spec.path.path
    if end is None:
        return False, f"no answer ({path} path)"
    if end.error is not None:
        return False, (f"failed in {elapsed:.2f} s ({path} path): {end.error.code}: "
                       f"{end.error.message}")
    shown = "".join(text)[:40]
    return (end.status == "completed",
            f"{end.status} in {elapsed:.2f} s ({path} path): {shown!r}, finish {end.reason}, "
            f"{end.usage.completion_tokens} completion token(s)"
            f"{' (estimated)' if end.usage.estimated else ''}")


async def check_aliases(specs: list[ModelSpec], *, probe: bool,
                        timeout: float = 30.0) -> list[AliasReport]:
    reports = []
    for spec in specs:
        report = describe_alias(spec)
        if probe and report.usable:
            ok, said = await probe_alias(spec, timeout)
            report.probe = said
            report.usable = ok
        elif probe:
            report.probe = "not made (fix the problem above first)"
        reports.append(report)
    from relay.upstream.fast import close_idle_http_client

    await close_idle_http_client()
    return reports
