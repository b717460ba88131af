"""Shared test setup. LiteLLM must never fetch its cost map from the network."""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_LOG", "ERROR")


_NODE_REPORTS: list[str] = []


def pytest_runtest_logreport(report):
    """Collect the ``node_report`` properties (tests/relay/test_aisdk_transport.py). Reports
    of xdist workers reach the controller with their properties, so this works with -n."""
    if report.when == "call":
        _NODE_REPORTS.extend(value for name, value in report.user_properties
                             if name == "node_report")


def pytest_terminal_summary(terminalreporter):
    """What Node's test runner counted in the AI SDK transport test (it runs inside one
    pytest test), so the CI log reports those tests too."""
    for line in _NODE_REPORTS:
        terminalreporter.write_line(line)


# --- event loops. `relay serve` runs on uvloop when it is installed (relay/runtime/eventloop.py:
# the default, `--loop auto`), so the suite's async tests do too; modules marked `both_loops`
# also run on asyncio's own loop (`--loop asyncio`, and every machine without uvloop).
# RELAY_TEST_LOOP=asyncio runs the whole suite on asyncio's loop instead.
def _loop_factories() -> dict:
    import asyncio

    factories = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:           # uvloop is a dependency on Linux/macOS: fail, never skip
        return factories
    return {"uvloop": uvloop.new_event_loop, **factories}


def pytest_configure(config):
    config.addinivalue_line("markers", "both_loops: run on uvloop and on asyncio's own loop")


def pytest_asyncio_loop_factories(config, item):
    factories = _loop_factories()
    if item.get_closest_marker("both_loops") is not None:
        return factories
    chosen = os.environ.get("RELAY_TEST_LOOP") or next(iter(factories))
    return {chosen: factories[chosen]}


# --- order. Under xdist (.ci/run: `pytest -n`) a run lasts as long as its busiest worker, and
# a test that starts relay processes, Node or LiteLLM imports takes 10-60 s on a loaded
# 2-core machine. Started last, one of them keeps one worker busy while the others idle; so
# the modules holding them run first (longest first, as measured), then every other test in
# its usual order. The order of tests within a module is kept.
LONG_MODULES_FIRST = (
    "tests/relay/test_workers.py",
    "tests/relay/test_aisdk_transport.py",
    "tests/relay/test_multinode.py",
    "tests/relay/test_cli.py",
    "tests/relay/test_first_run_failures.py",
    "tests/relay/test_limits.py",
    "tests/relay/test_litellm_memory.py",
    "tests/relay/test_soak.py",
    "tests/test_readme_examples.py",
    "tests/relay/test_event_loop.py",
    "tests/relay/test_newcomer_messages.py",
    "tests/relay/test_warmup.py",
)


def pytest_collection_modifyitems(items):
    rank = {module: i for i, module in enumerate(LONG_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
