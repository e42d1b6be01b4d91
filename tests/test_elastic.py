"""Elastic workers on loopback (issue 23): a lost worker host's job runs elsewhere within a
minute, and no job is handed out twice while its holder lives, however long it runs.

Two real single-process workers (the local stack's and a `bgq worker`) on an embedded Redis and
one file store, fed by a real `bgq ingest`; the scenarios are bench/elastic.py's, which
`make bench-elastic` prints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.elastic import duplicates, host_loss
from tests.helpers import assert_same_pixels


def assert_outputs(src: Path, out: Path, reference: Callable[..., bytes]) -> None:
    """Every input of `src` has its output under `out`, pixel-identical to rembg's."""
    inputs = sorted(p for p in src.rglob("*.jpg"))
    assert inputs
    for path in inputs:
        result = out / path.relative_to(src).with_suffix(".png")
        assert result.is_file(), f"no output for {path.name}"
        assert_same_pixels(result, reference(path.read_bytes()))


def test_a_lost_worker_host_s_job_runs_elsewhere_within_a_minute(
    tmp_path: Path, model_home: Path, reference: Callable[..., bytes]
) -> None:
    """24 1080p images; every process of the second worker SIGKILLed once it has a job: the
    ingest ends, exit 0, <= 60 s + the remaining work after the kill (the survivor's time for
    the other inputs, and the lost one's once more)."""
    loss, out = host_loss(tmp_path, model_home, images=24)
    print(loss.line())
    assert loss.finished is not None and loss.exit_code == 0, loss.line()
    assert loss.finished <= loss.budget, loss.line()
    assert_outputs(tmp_path / "src", out, reference)


def test_no_job_is_handed_out_twice_while_its_holder_lives(
    tmp_path: Path, model_home: Path
) -> None:
    """60 distinct inputs on two workers with a 10 s lease (renewed every 10/6 s), one job held
    at its input for twice the lease and more: one process ever holds it, and the model ran
    once per input. (`make bench-elastic` runs 200 with the default 30 s lease.)"""
    dup = duplicates(tmp_path, model_home, images=60, lease=10)
    print(dup.line())
    assert dup.held > 2 * dup.lease and dup.exit_code == 0, dup.line()
    assert dup.readers == 1, dup.line()
    stats = dup.stats
    assert stats.get("inferences") == stats.get("computed") == 60, dup.line()
    assert stats.get("failed", 0) == 0 and stats.get("skipped", 0) == 0, dup.line()
