"""The `bgq` command line as users run it, in separate processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgq.options import PYTHON_ONLY, Options
from bgq.settings import Settings
from producer import Producer
from producer.cli.options import FLAGS, PARAMETERS
from producer.cli.services import consumed_queues, lane_queues, queue_models
from tests.helpers import (
    BGQ,
    SAMPLES,
    bgq,
    bgq_in_process,
    processes_mentioning,
    variant,
    wait_for,
)


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

        other = tmp_path / "boot.jpg"
        other.write_bytes(variant("car-1.jpg", (30, 30, 300, 220)))
        bulk = bgq("submit", str(other), "--lane", "bulk", env=env)
        assert bulk.returncode == 0 and "cached: no" in bulk.stdout, bulk.stderr

        broken = tmp_path / "broken.jpg"
        broken.write_bytes(SAMPLES.joinpath("car-1.jpg").read_bytes()[:20000])
        failed = bgq("submit", str(broken), env=env)
        assert failed.returncode == 1
        assert "truncated" in failed.stderr and len(failed.stderr.strip().splitlines()) == 1

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0, log.read_text()
    assert processes_mentioning(env["BGQ_HOME"]) == []
    assert not (Path(env["BGQ_HOME"]) / "run" / "redis.json").exists()


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


def test_commands_explain_what_to_do_when_nothing_runs(env: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(variant("car-1.jpg", (0, 0, 100, 100)))
    submit = bgq("submit", str(image), env=env, timeout=30)
    assert submit.returncode == 2
    assert "bgq up" in submit.stderr and "BGQ_REDIS_URL" in submit.stderr
    assert bgq("status", env=env, timeout=30).returncode != 0


def test_unknown_model_is_a_usage_error(env: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(variant("car-1.jpg", (0, 0, 100, 100)))
    real = bgq("models", "fetch", "nomodel", env=env, timeout=30)
    here = bgq_in_process("submit", str(image), "-m", "nomodel", env=env)
    for result in (real, here):
        assert result.returncode == 2, result.args
        assert "unknown model 'nomodel'" in result.stderr and "u2netp" in result.stderr


def test_an_unknown_lane_is_a_usage_error(env: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(variant("car-1.jpg", (0, 0, 100, 100)))
    result = bgq_in_process("submit", str(image), "--lane", "fast", env=env)
    assert result.returncode == 2 and "must be one of interactive, bulk" in result.stderr


def test_bad_setting_names_the_variable(env: dict[str, str]) -> None:
    result = bgq("status", env={**env, "BGQ_MAX_MEGAPIXELS": "lots"}, timeout=30)
    assert result.returncode == 2
    assert "BGQ_MAX_MEGAPIXELS" in result.stderr
    assert "Traceback" not in result.stderr


def _worker_serves(env: dict[str, str], tmp_path: Path, cmd: list[str]) -> None:
    log = tmp_path / "worker.log"
    settings = Settings(home=Path(env["BGQ_HOME"]), redis_url=env["BGQ_REDIS_URL"])
    with background(cmd, env, log) as worker, Producer(settings) as producer:
        # Pinged from here while it boots (a `bgq status` per try would take the CPU it needs).
        wait_for(producer.workers_online, what="a worker")
        status = bgq("status", env=env, timeout=30)
        assert status.returncode == 0, status.stdout + status.stderr
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


@pytest.mark.parametrize("serves", [[], ["--models", "u2netp", "--lanes", "interactive,bulk"]])
def test_bgq_worker_with_redis_url(
    env: dict[str, str], tmp_path: Path, redis_url: str, serves: list[str]
) -> None:
    env = {**env, "BGQ_REDIS_URL": redis_url}
    _worker_serves(env, tmp_path, [BGQ, "worker", "--concurrency", "1", *serves])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--models", "u2netp,nope"], "BGQ_MODELS='u2netp,nope': unknown model 'nope'"),
        (["--lanes", "sideways"], "--lanes: name some of interactive, bulk, not 'sideways'"),
        (["--lanes", "bulk", "-Q", "bgq"], "--lanes and --queues both name the queues"),
    ],
)
def test_bgq_worker_refuses_bad_models_and_lanes(
    env: dict[str, str], redis_url: str, args: list[str], words: str
) -> None:
    result = bgq_in_process("worker", *args, env={**env, "BGQ_REDIS_URL": redis_url})
    assert result.returncode == 2 and words in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("lanes", "models", "queues"),
    [
        ("interactive,bulk", ["u2netp"], {"bgq", "bgq.bulk"}),
        ("bulk", ["u2netp", "u2net"], {"bgq.bulk", "bgq.bulk@u2net"}),
        (" interactive ", ["u2net"], {"bgq@u2net"}),
    ],
)
def test_worker_lanes_are_each_models_queues(
    lanes: str, models: list[str], queues: set[str]
) -> None:
    assert lane_queues(lanes, models) == queues
    assert queue_models(queues) == sorted(models)


@pytest.mark.parametrize(
    ("args", "queues"),
    [
        ([], None),
        (["-Q", "bgq.webhooks,bgq.maintenance"], {"bgq.webhooks", "bgq.maintenance"}),
        (["--concurrency", "4", "--queues=bgq"], {"bgq"}),
        (["-Qbgq.webhooks"], {"bgq.webhooks"}),
    ],
)
def test_worker_reads_the_queues_it_will_consume(args: list[str], queues: set[str] | None) -> None:
    """A worker that serves no image queue needs no model weights (`bgq worker -Q ...`)."""
    assert consumed_queues(args) == queues


def test_every_output_option_has_one_flag_entry() -> None:
    """The flags come from Options' fields (but bg_image, a stored input's digest); FLAGS adds
    only each one's short flag and help."""
    assert set(FLAGS) == set(Options.model_fields) - PYTHON_ONLY == {p.name for p in PARAMETERS}


def test_offline_models_fetch_names_where_the_weights_go(env: dict[str, str]) -> None:
    """Without the internet, fetching a model other than u2netp fails naming the file's path,
    for a copy made by other means (an unreachable proxy stands in for no network)."""
    proxy = "http://127.0.0.1:9"  # the discard port: nothing listens
    offline = {**env, "HTTPS_PROXY": proxy, "https_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    offline["BGQ_MODELS_DIR"] = env["BGQ_HOME"]
    result = bgq("models", "fetch", "silueta", env=offline, timeout=120)
    path = Path(env["BGQ_HOME"]) / "models" / "silueta" / "silueta.onnx"
    assert result.returncode == 2, result.stderr
    assert "this needs internet access" in result.stderr, result.stderr
    assert result.stderr.strip().endswith(f"or the file copied by other means to {path}")
    assert not path.exists()
