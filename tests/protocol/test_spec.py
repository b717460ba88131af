"""PROTOCOL.md is tested as behaviour.

``SPEC_TESTS`` maps every section of PROTOCOL.md to the tests that drive what it states
(file::function, most of them through the real relay on a real socket; the statements no
other test drove are in tests/relay/test_spec_behaviour.py). A test fails when a section is
missing from the table (every section with a MUST or SHOULD among them), when the table
names a test that does not exist, or names a section the spec no longer has. So a new
normative section needs a test before it lands.

Besides, the spec and the code stay in step on their lists: the spec names every frame type,
error code, close code, finish status/reason and allowed param the code knows, and its JSON
Schema section lists exactly the schema's frame types."""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path

import pytest

import llm_relay_protocol
from llm_relay_protocol import ALLOWED_PARAMS, CloseCode, ErrorCode, FinishReason, FinishStatus
from llm_relay_protocol.messages import CLIENT_FRAME_TYPES, SERVER_FRAME_TYPES

PROTOCOL_DIR = Path(llm_relay_protocol.__file__).parent
ROOT = Path(__file__).resolve().parents[2]  # the repository (not where the package is)
SPEC = (PROTOCOL_DIR / "PROTOCOL.md").read_text(encoding="utf-8")
FRAME_TYPES = sorted(set(CLIENT_FRAME_TYPES) | set(SERVER_FRAME_TYPES))

CORE = "tests/relay/test_core.py"
SPECB = "tests/relay/test_spec_behaviour.py"
RESUME = "tests/relay/test_resume.py"
MULTI = "tests/relay/test_multinode.py"
VIEW = "tests/relay/test_viewers.py"
VIEWR = "tests/relay/test_viewers_redis.py"
BAD = "tests/relay/test_bad_input.py"
AUTH = "tests/relay/test_auth.py"
LIMITS = "tests/relay/test_limits.py"
HTTP = "tests/relay/test_http_hardening.py"
BACK = "tests/relay/test_backpressure.py"
PROV = "tests/relay/test_providers.py"
STREAMER = "tests/relay/test_streamer.py"
FLIMITS = "tests/relay/test_frame_limits.py"
FAST = "tests/relay/test_fast_path.py"
HERE = "tests/protocol/test_spec.py"

#: PROTOCOL.md section heading -> the tests that drive its statements.
SPEC_TESTS: dict[str, list[str]] = {
    "Transport": [
        f"{CORE}::test_health_endpoints_and_unknown_path",
        f"{HTTP}::test_head_answers_like_get_without_the_body",
        f"{HTTP}::test_other_methods_are_405_with_allow",
        f"{HTTP}::test_a_request_with_a_body_gets_405_or_400",
        f"{HTTP}::test_pipelined_requests_are_400_not_a_traceback",
        f"{HTTP}::test_a_header_sent_twice_is_400_not_a_traceback",
        f"{CORE}::test_bad_frames_get_bad_request_and_connection_survives",   # binary
        f"{CORE}::test_oversize_frame_closes_1009",
        f"{BAD}::test_oversize_first_frame_closes_1009_before_hello",
        f"{CORE}::test_ping_pong_echoes_data",
    ],
    "Version negotiation": [
        f"{SPECB}::test_the_server_selects_v1_among_other_offered_subprotocols",
        f"{CORE}::test_missing_subprotocol_closes_4406",
    ],
    "Handshake": [
        f"{CORE}::test_no_hello_in_time_closes_4408",
        f"{CORE}::test_first_frame_not_hello_closes_4401",
        f"{CORE}::test_non_ascii_bad_first_frame_still_closes_4401",
        f"{SPECB}::test_frames_sent_right_after_hello_are_handled_in_order_after_welcome",
        f"{CORE}::test_bad_frames_get_bad_request_and_connection_survives",   # hello again
    ],
    "Authentication": [
        f"{AUTH}::test_bearer_header_api_key_ok_and_principal_is_key_label",
        f"{AUTH}::test_hashed_key_in_settings_ok",
        f"{AUTH}::test_bad_authorization_header_refused_http_401",
        f"{AUTH}::test_expired_token_in_header_refused_http_401_saying_expired",
        f"{AUTH}::test_hello_token_api_key_ok",
        f"{AUTH}::test_auth_off_ignores_credentials_and_principal_is_address",
        f"{AUTH}::test_missing_token_closes_4401_and_nothing_served",
        f"{AUTH}::test_invalid_token_closes_4401_invalid_token",
        f"{AUTH}::test_expired_token_closes_4401_token_expired",
        f"{AUTH}::test_time_claims_must_be_integer_unix_seconds_else_invalid_token",
        f"{AUTH}::test_nbf_in_the_future_is_not_yet_valid_and_a_past_nbf_is_accepted",
        f"{AUTH}::test_models_claim_filters_welcome_and_other_alias_is_unknown_model",
        f"{AUTH}::test_max_streams_claim_caps_streams_of_the_connection_and_principal",
        f"{AUTH}::test_a_token_whose_sub_looks_like_a_key_label_is_not_that_keys_principal",
        f"{LIMITS}::test_connections_per_principal_close_4429_others_unaffected",
        f"{AUTH}::test_token_expiring_while_streaming_next_start_closes_4401_after_running_finish",
        f"{AUTH}::test_secrets_never_in_logs_frames_or_repr",
    ],
    "Streams, ids and `seq`": [
        f"{SPECB}::test_a_stream_id_may_be_reused_once_its_finish_was_received",
        f"{CORE}::test_start_refusals_are_errors_with_the_id",
        f"{FLIMITS}::test_stream_id_with_control_characters_is_bad_request_and_never_logged",
        f"{CORE}::test_two_concurrent_streams_interleave_on_one_socket",
        f"{SPECB}::test_seqs_are_consecutive_without_merging_and_only_stream_frames_carry_one",
        f"{SPECB}::test_tool_call_events_after_a_cancel_take_no_seq",
        f"{BACK}::test_a_lagging_client_gets_merged_token_frames_and_loses_nothing",
        f"{CORE}::test_happy_path_welcome_started_tokens_finish",
    ],
    "Frames": [
        f"{SPECB}::test_every_server_frame_matches_the_models_and_has_no_null_optional_field",
    ],
    "`hello`": [
        f"{CORE}::test_no_hello_in_time_closes_4408",
        f"{CORE}::test_first_frame_not_hello_closes_4401",
        f"{BAD}::test_oversize_first_frame_closes_1009_before_hello",
        f"{AUTH}::test_missing_token_closes_4401_and_nothing_served",
        f"{AUTH}::test_invalid_token_closes_4401_invalid_token",
        f"{AUTH}::test_expired_token_closes_4401_token_expired",
        f"{CORE}::test_bad_frames_get_bad_request_and_connection_survives",
    ],
    "`welcome`": [
        f"{CORE}::test_happy_path_welcome_started_tokens_finish",
        f"{RESUME}::test_welcome_announces_detach_grace",
        f"{AUTH}::test_models_claim_filters_welcome_and_other_alias_is_unknown_model",
        f"{AUTH}::test_max_streams_claim_caps_streams_of_the_connection_and_principal",
    ],
    "`start`": [
        f"{CORE}::test_start_refusals_are_errors_with_the_id",
        f"{CORE}::test_bad_frames_get_bad_request_and_connection_survives",
        f"{BAD}::test_out_of_range_or_mistyped_start_fields_get_bad_request",
        f"{SPECB}::test_params_null_is_bad_request_and_a_null_param_counts_as_absent",
        f"{PROV}::test_per_alias_timeouts_and_max_tokens_ceiling_from_config",
        f"{PROV}::test_tool_round_trip_reaches_provider_in_its_format",
        f"{LIMITS}::test_messages_payload_limit_is_bad_request_not_close",
        f"{LIMITS}::test_start_rate_limit_with_retry_after",
        f"{BAD}::test_upgrade_while_draining_is_http_503_and_start_is_draining",
    ],
    "`started`": [
        f"{CORE}::test_happy_path_welcome_started_tokens_finish",
        f"{BAD}::test_upstream_unreachable_finish_failed_upstream_error",
        f"{PROV}::test_upstream_http_errors_map_to_safe_codes",
    ],
    "`token`": [
        f"{CORE}::test_happy_path_welcome_started_tokens_finish",
        f"{CORE}::test_cancel_mid_stream_closes_upstream",
    ],
    "`reasoning`": [
        f"{PROV}::test_text_reasoning_and_provider_usage",
        f"{STREAMER}::test_reasoning_is_its_own_event",
    ],
    "`refusal`": [
        f"{FAST}::test_refusal_reaches_the_client",
        f"{FAST}::test_anthropic_refusal_stop_reason_is_content_filter",
    ],
    "`tool_call_chunk`": [
        f"{CORE}::test_demo_tool_call_frames_join_exactly",
        f"{PROV}::test_tool_calls_exact_arguments",
        f"{STREAMER}::test_tool_call_without_provider_id_gets_one",
    ],
    "`tool_call_complete`": [
        f"{CORE}::test_demo_tool_call_frames_join_exactly",
        f"{STREAMER}::test_tool_calls_assembled_by_index_whatever_finish_reason",
        f"{SPECB}::test_tool_call_events_after_a_cancel_take_no_seq",
    ],
    "`finish`": [
        f"{CORE}::test_happy_path_welcome_started_tokens_finish",
        f"{CORE}::test_max_tokens_gives_length",
        f"{PROV}::test_upstream_http_errors_map_to_safe_codes",
        f"{PROV}::test_cut_or_malformed_stream_fails_with_upstream_error",
        f"{PROV}::test_timeouts_end_stream_and_close_upstream",
        f"{PROV}::test_no_provider_usage_gives_estimate",
        f"{BAD}::test_upstream_rejects_request_finish_failed_bad_request",
        f"{STREAMER}::test_retries_before_first_token_is_opt_in",
        f"{SPECB}::test_the_fallback_finish_carries_internal_error_as_its_reason",
        f"{SPECB}::test_every_server_frame_matches_the_models_and_has_no_null_optional_field",
    ],
    "`cancel`": [
        f"{CORE}::test_cancel_mid_stream_closes_upstream",
        f"{CORE}::test_cancel_before_first_token",
        f"{CORE}::test_cancel_twice_and_cancel_after_finish",
        f"{CORE}::test_cancel_unknown_id",
        f"{CORE}::test_cancel_sent_right_after_start_is_not_lost",
        f"{STREAMER}::test_cancel_interrupts_a_silent_upstream_at_once",
        f"{PROV}::test_cancel_closes_upstream_within_100ms",
    ],
    "`resume`": [
        f"{RESUME}::test_resume_after_a_dropped_connection_replays_every_frame_exactly_once",
        f"{RESUME}::test_resume_of_a_finished_stream_replays_through_its_finish",
        f"{RESUME}::test_unknown_and_foreign_keys_get_the_same_unknown_stream_answer",
        f"{RESUME}::test_frames_trimmed_by_the_per_stream_cap_are_stream_lost",
        f"{RESUME}::test_memory_budget_drops_the_oldest_detached_stream",
        f"{RESUME}::test_resume_under_an_id_already_running_is_duplicate_id",
        f"{RESUME}::test_after_seq_beyond_the_stream_is_bad_request",
        f"{MULTI}::test_after_seq_beyond_a_finished_stream_is_bad_request_on_the_other_relay",
        f"{MULTI}::test_after_seq_beyond_a_running_stream_ends_in_bad_request_on_the_other_relay",
        f"{RESUME}::test_resume_with_takeover_takes_a_stream_over_from_a_half_open_connection",
        f"{RESUME}::test_a_takeover_under_a_second_id_on_the_same_connection_ends_the_first_id",
        f"{MULTI}::test_a_takeover_on_another_relay_takes_the_stream_over",
        f"{MULTI}::test_unknown_and_foreign_keys_are_unknown_stream_on_every_relay",
        f"{MULTI}::test_a_relay_killed_mid_stream_is_stream_lost_on_resume_and_stops_counting_in_time",
    ],
    "`resumed`": [
        f"{RESUME}::test_resume_after_a_dropped_connection_replays_every_frame_exactly_once",
        f"{MULTI}::test_a_stream_started_on_one_relay_resumes_on_the_other",
    ],
    "`ping`": [
        f"{CORE}::test_ping_pong_echoes_data",
        f"{BACK}::test_ping_data_over_1_kib_is_bad_request_and_1_kib_is_echoed",
    ],
    "`pong`": [
        f"{CORE}::test_ping_pong_echoes_data",
        f"{BAD}::test_integer_beyond_64_bits_is_read_as_a_double",
        f"{SPECB}::test_every_server_frame_matches_the_models_and_has_no_null_optional_field",
    ],
    "`error`": [
        f"{SPECB}::test_an_error_names_the_id_of_the_frame_it_answers_even_an_invalid_one",
        f"{CORE}::test_bad_frames_get_bad_request_and_connection_survives",
        f"{CORE}::test_start_refusals_are_errors_with_the_id",
        f"{RESUME}::test_resume_with_takeover_takes_a_stream_over_from_a_half_open_connection",
    ],
    "Limits and refusals at the door": [
        f"{LIMITS}::test_forged_origin_refused_403_own_origin_and_no_origin_accepted",
        f"{LIMITS}::test_allow_origin_list_and_star",
        f"{HTTP}::test_sockets_without_hello_cannot_lock_out_an_authenticated_user",
        f"{HTTP}::test_pending_connections_are_capped_in_total",
        f"{BAD}::test_upgrade_while_draining_is_http_503_and_start_is_draining",
        f"{LIMITS}::test_connections_per_principal_close_4429_others_unaffected",
        f"{LIMITS}::test_max_connections_per_server_close_4429",
        f"{LIMITS}::test_frame_flood_closes_4429_and_other_connections_keep_serving",
        f"{LIMITS}::test_streams_per_principal_too_many_streams",
        f"{LIMITS}::test_start_rate_limit_with_retry_after",
        f"{AUTH}::test_completion_token_budget_rate_limits_principal_others_unaffected",
        f"{LIMITS}::test_messages_payload_limit_is_bad_request_not_close",
        f"{HTTP}::test_forwarded_for_uses_the_rightmost_untrusted_entry",
        f"{HTTP}::test_dns_rebinding_host_header_does_not_make_an_origin_the_relays_own",
        f"{HTTP}::test_own_origins_come_from_the_listen_address_or_public_url",
    ],
    "Frame limits": [
        f"{FLIMITS}::test_frames_beyond_the_decode_limits_get_bad_request_and_no_error_log",
        f"{FLIMITS}::test_deeply_nested_json_is_bad_request_without_a_traceback",
        f"{FLIMITS}::test_decode_limits_come_from_the_settings",
    ],
    "Bad input": [
        f"{SPECB}::test_the_bad_input_table_is_what_the_relay_answers",
        f"{BAD}::test_edge_case_text_frames_get_bad_request",
        f"{BAD}::test_unknown_fields_are_ignored_and_duplicate_keys_last_wins",
        f"{BAD}::test_integer_beyond_64_bits_is_read_as_a_double",
        f"{CORE}::test_oversize_frame_closes_1009",
    ],
    "Error codes": [
        f"{CORE}::test_start_refusals_are_errors_with_the_id",
        f"{CORE}::test_cancel_unknown_id",
        f"{RESUME}::test_frames_trimmed_by_the_per_stream_cap_are_stream_lost",
        f"{MULTI}::test_redis_failing_mid_stream_local_streams_finish_and_resumes_get_a_clear_error",
        f"{PROV}::test_upstream_http_errors_map_to_safe_codes",
        f"{FAST}::test_overloaded_is_its_own_retryable_answer",
        f"{LIMITS}::test_start_rate_limit_with_retry_after",
        f"{BAD}::test_upgrade_while_draining_is_http_503_and_start_is_draining",
        f"{SPECB}::test_the_fallback_finish_carries_internal_error_as_its_reason",
        f"{HERE}::test_every_error_code_is_documented",
    ],
    "Close codes": [
        f"{CORE}::test_server_shutdown_finishes_streams_then_closes_1001",
        f"{CORE}::test_oversize_frame_closes_1009",
        f"{MULTI}::test_rolling_restart_of_one_of_two_relay_processes_loses_nothing",
        f"{BACK}::test_a_client_that_stops_reading_is_closed_4008_with_memory_bounded",
        f"{CORE}::test_first_frame_not_hello_closes_4401",
        f"{CORE}::test_missing_subprotocol_closes_4406",
        f"{CORE}::test_no_hello_in_time_closes_4408",
        f"{LIMITS}::test_max_connections_per_server_close_4429",
        f"{HERE}::test_the_relay_never_sends_close_4400",
        f"{HERE}::test_every_close_code_is_documented",
    ],
    "Connection end and server shutdown": [
        f"{CORE}::test_client_disconnect_mid_stream_closes_upstream",
        f"{RESUME}::test_with_detach_grace_zero_a_disconnect_cancels_at_once_and_nothing_resumes",
        f"{CORE}::test_server_shutdown_finishes_streams_then_closes_1001",
        f"{LIMITS}::test_sigterm_drains_then_closes_1001_and_exits_0",
        f"{MULTI}::test_rolling_restart_of_one_of_two_relay_processes_loses_nothing",
    ],
    "Resume and detached streams": [
        f"{RESUME}::test_a_stream_nobody_resumes_is_cancelled_upstream_after_the_grace",
        f"{RESUME}::test_resume_of_a_finished_stream_replays_through_its_finish",
        f"{RESUME}::test_cancel_after_resume_stops_the_upstream",
        f"{RESUME}::test_resume_with_takeover_takes_a_stream_over_from_a_half_open_connection",
        f"{RESUME}::test_frames_trimmed_by_the_per_stream_cap_are_stream_lost",
        f"{RESUME}::test_memory_budget_drops_the_oldest_detached_stream",
        f"{RESUME}::test_two_resumes_in_a_row_still_deliver_everything_once",
    ],
    "Viewers": [
        f"{VIEW}::test_two_viewers_and_the_owner_each_get_every_frame_once_and_the_one_finish",
        f"{VIEW}::test_a_slow_viewer_is_closed_4008_and_never_slows_the_owner_or_another_viewer",
        f"{VIEW}::test_any_viewer_may_cancel_and_everyone_gets_the_cancelled_finish",
        f"{VIEW}::test_a_takeover_ends_the_owner_and_every_viewer_and_gets_the_rest_alone",
        f"{VIEW}::test_a_stream_keeps_running_past_the_grace_while_a_viewer_watches_its_owner_gone",
        f"{VIEW}::test_one_viewer_too_many_is_refused_too_many_streams_and_disturbs_nobody",
        f"{VIEW}::test_the_python_client_watches_a_stream_started_by_another_client",
        f"{VIEWR}::test_viewers_on_both_relays_each_get_every_frame_once_and_the_one_finish",
        f"{VIEWR}::test_the_owner_relay_dying_ends_every_viewer_with_stream_lost",
    ],
    "Backpressure": [
        f"{BACK}::test_a_lagging_client_gets_merged_token_frames_and_loses_nothing",
        f"{BACK}::test_a_client_that_stops_reading_is_closed_4008_with_memory_bounded",
        f"{BACK}::test_a_client_flooding_pings_without_reading_is_closed_4008_with_memory_bounded",
        f"{BACK}::test_a_control_backlog_past_twice_the_limit_closes_4008_without_waiting_the_grace",
    ],
    "Forward compatibility": [
        f"{BAD}::test_unknown_fields_are_ignored_and_duplicate_keys_last_wins",
        "tests/protocol/test_frames.py::test_decode_server_frame_ignores_unknown_types",
        "tests/protocol/test_frames.py::test_decode_server_frame_ignores_unknown_fields",
        f"{CORE}::test_bad_frames_get_bad_request_and_connection_survives",
    ],
    "JSON Schema": [
        "tests/protocol/test_schema.py::test_committed_schema_is_current",
        f"{HERE}::test_the_json_schema_section_lists_the_schemas_frame_types",
    ],
    "Example session": [
        f"{SPECB}::test_the_example_session_runs_as_written",
    ],
}

#: Sections with nothing a test could drive.
NOT_DRIVABLE = {"Contents"}


def _sections() -> dict[str, str]:
    """``##``/``###`` heading -> its text up to the next heading."""
    parts = re.split(r"^#{2,3} (.+)$", SPEC, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


@cache
def _test_functions(path: str) -> frozenset[str]:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    return frozenset(node.name for node in tree.body
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


def test_frame_types_known():
    assert set(FRAME_TYPES) == {"hello", "welcome", "start", "started", "token", "reasoning",
                                "refusal",
                                "tool_call_chunk", "tool_call_complete", "finish", "cancel",
                                "ping", "pong", "error", "resume", "resumed"}


@pytest.mark.parametrize("ftype", FRAME_TYPES)
def test_every_frame_type_has_a_section(ftype):
    assert re.search(rf"^### `{ftype}`$", SPEC, re.M), f"PROTOCOL.md: no section for {ftype}"
    assert f'"type": "{ftype}"' in SPEC, f"PROTOCOL.md: no JSON example of {ftype}"


@pytest.mark.parametrize("code", [e.value for e in ErrorCode])
def test_every_error_code_is_documented(code):
    assert re.search(rf"^\| `{code}` \|", SPEC, re.M), f"PROTOCOL.md: {code} not in the table"


@pytest.mark.parametrize("code", [c for c in CloseCode if c is not CloseCode.PROTOCOL_VIOLATION],
                         ids=lambda c: str(int(c)))
def test_every_close_code_is_documented(code):
    """Every close code the relay sends is a row of the table (4400, never sent, is not:
    test_the_relay_never_sends_close_4400)."""
    row = re.search(rf"^\| {int(code)} \| `{code.name}` \| (yes|no)\b", SPEC, re.M)
    assert row, f"PROTOCOL.md: close code {int(code)} missing from the table"
    assert (row.group(1) == "yes") is code.retryable, f"retry column of {int(code)}"


@pytest.mark.parametrize("value", [s.value for s in FinishStatus] +
                         [r.value for r in FinishReason])
def test_every_finish_status_and_reason_is_documented(value):
    assert f"`{value}`" in SPEC


@pytest.mark.parametrize("key", ALLOWED_PARAMS)
def test_every_allowed_param_is_documented(key):
    assert re.search(rf"^\| `{key}` \|", SPEC, re.M)


def test_version_and_path():
    assert f"`{llm_relay_protocol.PROTOCOL_VERSION}`" in SPEC
    assert "`/ws`" in SPEC
    assert "python -m llm_relay_protocol.schema --write" in SPEC


# ------------------------------------------------------------------ spec section -> tests

def test_every_normative_section_is_mapped_to_tests():
    sections = _sections()
    normative = {title for title, text in sections.items()
                 if re.search(r"\b(MUST|SHOULD)\b", text)}
    assert normative, "no MUST/SHOULD found: the parser is broken"
    assert normative <= SPEC_TESTS.keys(), f"no tests for {sorted(normative - SPEC_TESTS.keys())}"
    unmapped = sections.keys() - SPEC_TESTS.keys() - NOT_DRIVABLE
    assert not unmapped, f"PROTOCOL.md sections without tests: {sorted(unmapped)}"


def test_the_table_names_only_existing_sections_and_tests():
    sections = _sections()
    assert not SPEC_TESTS.keys() - sections.keys(), "sections the spec no longer has"
    missing = []
    for title, tests in SPEC_TESTS.items():
        assert tests, f"{title}: no tests"
        for name in tests:
            path, _, function = name.partition("::")
            if not (ROOT / path).is_file() or function not in _test_functions(path):
                missing.append(f"{title}: {name}")
    assert not missing, missing


# ------------------------------------------------------------------ statements checked here

def test_the_relay_never_sends_close_4400():
    """Close codes: 4400 is in the enum (the clients use it) but the relay never sends it,
    as PROTOCOL.md says. No module of relay/ names it."""
    server_side = [path for path in sorted((ROOT / "relay").rglob("*.py"))
                   if path.name != "client.py"]        # the Python client treats it as final
    users = [str(path.relative_to(ROOT)) for path in server_side
             if re.search(r"PROTOCOL_VIOLATION|\b4400\b", path.read_text(encoding="utf-8"))]
    assert users == []
    assert re.search(r"^4400 \(`CloseCode.PROTOCOL_VIOLATION`\) is \*\*never sent", SPEC, re.M)


def test_the_json_schema_section_lists_the_schemas_frame_types():
    """The JSON Schema section names exactly the frame types of each direction of
    clients/python/llm_relay_protocol/schema.json (it had left out resume/resumed)."""
    schema = json.loads((PROTOCOL_DIR / "schema.json").read_text(encoding="utf-8"))
    text = _sections()["JSON Schema"]
    for direction in ("client_to_server", "server_to_client", "relay_to_relay"):
        listed = re.search(rf"`{direction}` \(([^)]*)\)", text, re.S)
        assert listed, direction
        named = set(re.findall(r"`(\w+)`", listed.group(1)))
        in_schema = set(schema[direction]["discriminator"]["mapping"])
        assert named == in_schema, direction


def test_the_unknown_type_message_of_the_spec_is_the_codecs():
    """The bad-input table quotes the codec's message for an unknown type, with every
    client frame type (it had left out resume)."""
    assert (f"unknown frame type 'foo' (expected one of: {', '.join(CLIENT_FRAME_TYPES)})"
            in _sections()["Bad input"])


def test_the_clients_close_rule_is_the_one_protocol_md_states():
    """The retry rule is stated once (PROTOCOL.md "Close codes": the table's "Reconnect?"
    column plus its "Client policy" paragraph) and ``close_decision`` carries it out: every
    row's yes/no, 1005 and 1006 retried, 1000 and a code not listed final; the other
    documents point there instead of listing codes again (issue 22, item 5)."""
    from llm_relay_protocol.client_policy import close_decision

    rows = re.findall(r"^\| (\d{4}) \| `\w+` \| (yes|no)\b", SPEC, re.M)
    assert len(rows) == len(CloseCode) - 1                 # every code but 4400 (never sent)
    for code, reconnect in rows + [("1005", "yes"), ("1006", "yes"), ("1000", "no"),
                                   ("4400", "no"), ("4999", "no")]:
        decision = close_decision(int(code), "", welcomed=True, token_refreshable=True)
        assert decision.retry is (reconnect == "yes"), code
    docs = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md"))]
    for path in ("README.md", *docs, "clients/python/llm_relay_client/client.py", "clients/python/llm_relay_protocol/client_policy.py"):
        text = (ROOT / path).read_text(encoding="utf-8")
        assert not re.search(r"1001, 1011, 1012", text), f"{path} lists the retried codes again"
