"""A worker host cut off from the network for 5 minutes while it holds a job (issue 23):
five hosts on one machine (network namespaces on a bridge: bench/netns.py), real processes.

Its own module, so that pytest-xdist (--dist loadscope) runs it beside the rest of the suite:
it is mostly idle, and conftest.py puts it first so it starts at minute 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench.netns import missing
from bench.partition import partition
from tests.test_elastic import assert_outputs

CUT = 300.0  # s: the link stays down this long, the worker's processes alive


@pytest.mark.timeout(900)
def test_a_worker_cut_off_for_five_minutes_fails_nothing_and_changes_nothing(
    tmp_path: Path, model_home: Path, reference: Callable[..., bytes]
) -> None:
    if what := missing():
        pytest.fail(f"this test needs {what}")
    result = partition(tmp_path, model_home, images=16, cut_for=CUT)
    loss = result.loss
    print(loss.line())
    print(result.after_line())
    assert loss.finished is not None and loss.exit_code == 0, loss.line()
    assert loss.finished <= loss.budget, loss.line()
    assert_outputs(tmp_path / "src", result.out, reference)
    assert result.reconnected is not None, result.after_line()
    assert result.after == result.before, result.after_line()  # same keys, same bytes
    stats = result.stats
    assert stats.get("computed", 0) + stats.get("skipped", 0) == 16, result.after_line()
    assert stats.get("failed", 0) == 0 and result.failed == [], result.after_line()
    assert result.leftovers == []  # every namespace and link deleted (processes: conftest)
