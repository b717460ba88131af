"""Shared test setup. LiteLLM must never fetch its cost map from the network."""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_LOG", "ERROR")


def pytest_terminal_summary(terminalreporter):
    """What Node's test runner counted in the AI SDK transport test (it runs inside one
    pytest test), so the CI log reports those tests too."""
    from tests.relay.test_aisdk_transport import NODE_REPORTS

    for line in NODE_REPORTS:
        terminalreporter.write_line(line)
