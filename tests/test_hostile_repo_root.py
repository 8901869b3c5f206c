"""The repository root is a safe place to run the tests from, with either `pytest` or
`python -m pytest`: the root's `kernels/` folder (installed as minivllm.kernels) must never import
as the top-level `kernels` package that transformers imports. A CI run (CI=true) gets the
derandomized hypothesis profile without extra flags (tests/conftest.py)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_and_the_hypothesis_profile():
    """What the subprocess below runs; in this process it checks the current run the same way."""
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin is not None:
        assert not Path(spec.origin).resolve().is_relative_to(ROOT / "kernels"), spec.origin
    # transformers imports `kernels` here when a package of that name is installed.
    importlib.import_module("transformers.integrations.hub_kernels")
    if not os.environ.get("HYPOTHESIS_PROFILE"):
        current = settings()
        if os.environ.get("CI") == "true":
            assert current.derandomize and current.database is None
        elif not os.environ.get("CI"):
            assert not current.derandomize


def test_python_m_pytest_from_the_repository_root():
    env = {**os.environ, "CI": "true"}
    for name in ("HYPOTHESIS_PROFILE", "PYTHONSAFEPATH", "PYTHONPATH"):
        env.pop(name, None)
    node = f"{Path(__file__).relative_to(ROOT)}::test_kernels_and_the_hypothesis_profile"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "1 passed" in result.stdout
