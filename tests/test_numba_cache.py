"""make setup's numba warm-up: it covers every cached pymatting function and leaves a warm cache."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from workers import numba_cache


def test_groups_name_every_pymatting_module_with_cached_numba_functions() -> None:
    spec = importlib.util.find_spec("pymatting")
    assert spec is not None and spec.origin is not None
    root = Path(spec.origin).parent
    cached = {
        ".".join(("pymatting", *path.relative_to(root).with_suffix("").parts))
        for path in root.rglob("*.py")
        if "cache=True" in path.read_text()
    }
    grouped = [name for group in numba_cache.GROUPS for name in group]
    assert len(grouped) == len(set(grouped)), "a module is in two groups"
    assert cached and cached <= set(grouped), sorted(cached - set(grouped))


def test_warm_up_runs_both_groups_and_a_plain_import() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.numba_cache"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "numba cache for pymatting ready" in done.stdout
    assert "failed" not in done.stdout and "missed" not in done.stdout
