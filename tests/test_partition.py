"""A worker host cut off from the network for 5 minutes while it holds a job (issue 23):
five hosts on one machine (network namespaces on a bridge: bench/netns.py), real processes.

Its own module, so that pytest-xdist (--dist loadscope) runs it beside the rest of the suite:
it is mostly idle, and conftest.py puts it first so it starts at minute 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench.netns import missing, network_tag
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


def test_network_tags_never_collide() -> None:
    """Fixed-width fields: 7-digit pids keep every serial, and pid 123 serial 45 is not pid
    1234 serial 5; 9 characters, so a host's link name fits 15 with a 6-character name."""
    pids = (1, 123, 1234, 32767, 1234567, 2**22 - 1)
    tags = {network_tag(pid, serial) for pid in pids for serial in range(256)}
    assert len(tags) == len(pids) * 256
    assert {len(tag) for tag in tags} == {9}
    with pytest.raises(ValueError):
        network_tag(1234567, 256)
