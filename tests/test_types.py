"""The relay type-checks (issue 22, "typed insides"): mypy over ``clients/python/llm_relay_protocol/`` and ``relay/``
reports no error, strict for the sans-I/O cores (``clients/python/llm_relay_protocol/``, ``relay/core/``) and in its
default mode elsewhere, as configured in pyproject.toml (``[tool.mypy]``).

mypy runs in a subprocess, so ``pytest -n auto`` runs it beside the rest of the suite. Its
incremental cache lives in the system's temporary folder, one per checkout: a first run
(a fresh clone) takes ~10-20 s of one core, a rerun after a small change ~1-2 s.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cache_dir() -> Path:
    checkout = hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"llm-relay-mypy-{checkout}"


def test_mypy_finds_no_error():
    # The files to check and every option come from pyproject.toml's [tool.mypy].
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(_cache_dir()), "--no-color-output", "--no-error-summary"],
        cwd=ROOT, capture_output=True, text=True, timeout=170)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert result.returncode == 0 and not errors, (
        f"mypy exited {result.returncode} with {len(errors)} error(s):\n"
        + result.stdout + result.stderr)
