"""The `bgq` command line as users run it, in separate processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import SAMPLES, variant

BGQ = str(Path(sys.executable).with_name("bgq"))


@pytest.fixture
def env(tmp_path: Path, model_home: Path) -> dict[str, str]:
    """A fresh BGQ_HOME; the provisioned model weights."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BGQ_")}
    return {**clean, "BGQ_HOME": str(tmp_path / "home"), "BGQ_MODELS_DIR": str(model_home)}


def bgq(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BGQ, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@contextlib.contextmanager
def background(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run a long-lived command in its own process group; kill the group whatever happens."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(predicate: object, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        with contextlib.suppress(psutil.Error):
            if text in " ".join(proc.info["cmdline"] or []) or text in str(proc.info["environ"]):
                found.append(proc)
    return found


def test_up_then_submit_and_status_from_another_process(
    env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "up.log"
    image = tmp_path / "shoe.jpg"
    image.write_bytes(variant("car-1.jpg", (20, 20, 300, 220)))
    with background([BGQ, "up", "--workers", "2"], env, log) as up:
        wait_for(lambda: "ready" in log.read_text(), what="bgq up to be ready")
        status = bgq("status", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "1 online" in status.stdout and "queue depth: 0" in status.stdout

        first = bgq("submit", str(image), env=env)
        assert first.returncode == 0, first.stderr
        assert "cached: no" in first.stdout
        out = tmp_path / "shoe.out.png"
        assert out.is_file() and out.read_bytes().startswith(b"\x89PNG")

        second = bgq("submit", str(image), "--out", str(tmp_path / "again.png"), env=env)
        assert "cached: yes" in second.stdout
        assert (tmp_path / "again.png").read_bytes() == out.read_bytes()

        broken = tmp_path / "broken.jpg"
        broken.write_bytes(SAMPLES.joinpath("car-1.jpg").read_bytes()[:20000])
        failed = bgq("submit", str(broken), env=env)
        assert failed.returncode == 1
        assert "truncated" in failed.stderr and len(failed.stderr.strip().splitlines()) == 1

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0, log.read_text()
    assert processes_mentioning(env["BGQ_HOME"]) == []
    assert not (Path(env["BGQ_HOME"]) / "run" / "redis.json").exists()


def test_commands_explain_what_to_do_when_nothing_runs(env: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(variant("car-1.jpg", (0, 0, 100, 100)))
    submit = bgq("submit", str(image), env=env, timeout=30)
    assert submit.returncode == 2
    assert "bgq up" in submit.stderr and "BGQ_REDIS_URL" in submit.stderr
    assert bgq("status", env=env, timeout=30).returncode != 0


def test_bad_setting_names_the_variable(env: dict[str, str]) -> None:
    result = bgq("status", env={**env, "BGQ_MAX_MEGAPIXELS": "lots"}, timeout=30)
    assert result.returncode == 2
    assert "BGQ_MAX_MEGAPIXELS" in result.stderr
    assert "Traceback" not in result.stderr


def _worker_serves(env: dict[str, str], tmp_path: Path, cmd: list[str]) -> None:
    log = tmp_path / "worker.log"
    with background(cmd, env, log) as worker:
        wait_for(lambda: bgq("status", env=env, timeout=30).returncode == 0, what="a worker")
        image = tmp_path / "in.jpg"
        image.write_bytes(variant("anime-girl-1.jpg", (0, 0, 300 + len(cmd), 300)))
        result = bgq("submit", str(image), env=env)
        assert result.returncode == 0, result.stderr + log.read_text()[-2000:]
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def test_plain_celery_worker_with_redis_url(
    env: dict[str, str], tmp_path: Path, redis_url: str
) -> None:
    env = {**env, "BGQ_REDIS_URL": redis_url}
    cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-c", "1"]
    _worker_serves(env, tmp_path, cmd)


def test_bgq_worker_with_redis_url(env: dict[str, str], tmp_path: Path, redis_url: str) -> None:
    env = {**env, "BGQ_REDIS_URL": redis_url}
    _worker_serves(env, tmp_path, [BGQ, "worker", "--concurrency", "1"])


def test_demo_runs_the_samples_through_a_stack_it_starts(
    env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = bgq("demo", str(SAMPLES), "--out", str(out), "--workers", "2", env=env, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "anime-girl-1.png",
        "car-1.png",
        "cloth-1.png",
        "plants-1.png",
    ]
    assert "skipped" in first.stderr and "ATTRIBUTION.md" in first.stderr
    assert processes_mentioning(env["BGQ_HOME"]) == []

    again = bgq("demo", str(SAMPLES), "--out", str(out), env=env, timeout=60)
    assert again.returncode == 0
    assert again.stdout.count("cached") == 4
    assert "starting a local stack" not in again.stderr  # all cache hits: no worker needed
    state = Path(env["BGQ_HOME"]) / "run" / "redis.json"
    assert not state.exists() or json.loads(state.read_text()) == {}
