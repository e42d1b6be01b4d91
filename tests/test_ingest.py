"""`bgq ingest` end to end: real embedded Redis, prefork workers, u2netp, in separate processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.s3server import S3Server
from bgq import contract, defaults
from bgq.contract import RESULTS
from bgq.options import Options
from bgq.redis_server import EmbeddedRedis
from bgq.settings import Settings
from bgq.stack import LocalStack
from bgq.store import open_store
from producer import Producer
from producer.catalog import open_catalog
from producer.ingest import Folder, Ingest, default_run_id, run_ingest
from producer.job import Job
from tests.helpers import (
    BGQ,
    LocalStackControl,
    StandInWorker,
    bgq,
    bgq_in_process,
    processes_mentioning,
    variant,
    wait_for,
)
from tests.stacks import both_stores


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def report(path: Path) -> dict[str, dict[str, object]]:
    """The JSONL report keyed by the input's path relative to its catalog."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {Path(str(r["source"])).name: r for r in rows}


def catalog(root: Path) -> Path:
    """Nested images, a stem collision, and three inputs that must fail with a reason."""
    src = root / "catalog"
    write(src / "shoes" / "red" / "1.jpg", variant("car-1.jpg", (0, 0, 300, 200)))
    write(src / "shoes" / "blue" / "2.jpg", variant("cloth-1.jpg", (0, 0, 300, 400)))
    write(src / "a.jpg", variant("anime-girl-1.jpg", (0, 0, 300, 300)))
    write(src / "a.webp", variant("anime-girl-1.jpg", (10, 10, 310, 310), "WEBP"))
    write(src / "notes.txt", b"not an image at all\n")
    write(src / "empty.jpg", b"")
    (src / "broken.jpg").symlink_to(src / "missing.jpg")  # unreadable
    return src


def test_a_folder_catalog_then_a_second_run_that_is_all_cache_hits(
    env: dict[str, str], tmp_path: Path
) -> None:
    src, out = catalog(tmp_path), tmp_path / "out"
    first = bgq("ingest", str(src), "--out", str(out), env=env, timeout=300)
    assert first.returncode == 1, first.stdout + first.stderr  # some inputs failed
    rows = report(out / "bgq-report.jsonl")
    assert {name: r["status"] for name, r in rows.items()} == {
        "1.jpg": "done",
        "2.jpg": "done",
        "a.jpg": "done",
        "a.webp": "done",
        "notes.txt": "failed",
        "empty.jpg": "failed",
        "broken.jpg": "failed",
    }
    assert "not a recognised image" in str(rows["notes.txt"]["error"])
    assert "empty" in str(rows["empty.jpg"]["error"])
    assert "cannot read" in str(rows["broken.jpg"]["error"])
    for name in ("notes.txt", "empty.jpg", "broken.jpg"):
        assert f"FAILED {src / name}" in first.stdout
    made = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert made == ["a.jpg.png", "a.webp.png", "shoes/blue/2.png", "shoes/red/1.png"]
    store_file = Path(str(rows["1.jpg"]["output"]))
    assert store_file.stat().st_nlink == 2  # a hard link into the store
    assert processes_mentioning(env["BGQ_HOME"]) == []  # the embedded stack is gone

    worker_log = Path(env["BGQ_HOME"]) / "run" / "ingest-worker.log"
    log_size = worker_log.stat().st_size
    again = bgq("ingest", str(src), "--out", str(out), env=env, timeout=60)
    assert again.returncode == 1
    statuses = {name: r["status"] for name, r in report(out / "bgq-report.jsonl").items()}
    assert sorted(statuses.values()).count("cached") == 4
    assert "4 cached, 3 failed" in again.stdout
    assert worker_log.stat().st_size == log_size  # no worker was started


def test_usage_errors_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    assert bgq("ingest", str(tmp_path / "nope"), "--out", "o", env=env).returncode == 2
    here = bgq_in_process  # the rest refuse before anything starts: no process needed
    assert here("ingest", str(tmp_path), "--out", "o", "-m", "nomodel", env=env).returncode == 2
    assert here("ingest", str(tmp_path), "--out", "o", "-bgc", "1,2", env=env).returncode == 2
    assert here("ingest", str(tmp_path), env=env).returncode == 2  # --out is required
    lane = here("ingest", str(tmp_path), "--out", "o", "--lane", "fast", env=env)
    assert lane.returncode == 2 and "interactive, bulk" in lane.stderr
    run = here("ingest", str(tmp_path), "--out", "o", "--run-id", "two words", env=env)
    assert run.returncode == 2 and "run id 'two words'" in run.stderr


def test_the_default_run_id_names_the_host_and_the_source(tmp_path: Path) -> None:
    """The same SRC (however written) keeps its run, so a resume keeps its place; another
    catalog gets another run."""
    first = default_run_id(str(tmp_path / "a"))
    assert first == default_run_id(str(tmp_path / "b" / ".." / "a"))
    assert first != default_run_id(str(tmp_path / "b"))
    assert contract.check_run(first) == first and first.startswith(socket.gethostname()[:8])


def results(env: dict[str, str]) -> dict[str, int | None]:
    """The store's results, as the ingest's environment configures it, each with its file's
    inode on a directory store (a result written again is a new file: writes are atomic
    renames), else None. Not its mtime: that is prune's clock of last use, and a cache hit
    re-stamps a result older than USE_RESOLUTION."""
    values = {k.removeprefix("BGQ_").lower(): v for k, v in env.items() if k.startswith("BGQ_")}
    store = open_store(Settings(**values))  # type: ignore[arg-type]
    return {
        entry.name: (path.stat().st_ino if (path := store.local_path(entry.name)) else None)
        for entry in store.scan(RESULTS)
    }


def store_env(store_settings: dict[str, object]) -> dict[str, str]:
    return {f"BGQ_{k.upper()}": str(v) for k, v in store_settings.items()}


@both_stores
def test_resume_after_the_ingest_process_is_killed(
    env: dict[str, str], tmp_path: Path, store_settings: dict[str, object]
) -> None:
    env = {**env, **store_env(store_settings)}
    src, out = tmp_path / "catalog", tmp_path / "out"
    for i in range(8):
        write(src / f"{i}.jpg", variant("cloth-1.jpg", (i * 20, i * 20, 400 + i * 20, 500)))
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115 - closed below
    first = subprocess.Popen(
        [BGQ, "ingest", str(src), "--out", str(out), "--window", "4"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    report_file = out / "bgq-report.jsonl"
    try:
        wait_for(
            lambda: report_file.is_file() and len(report_file.read_text().splitlines()) >= 2,
            what="two finished inputs",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        log.close()
    wait_for(lambda: not processes_mentioning(env["BGQ_HOME"]), 60, "the stack to go away")
    before = results(env)
    assert 2 <= len(before) < 8

    second = bgq("ingest", str(src), "--out", str(out), env=env, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    rows = report(report_file)
    assert sorted(rows) == [f"{i}.jpg" for i in range(8)]
    assert {r["status"] for r in rows.values()} <= {"done", "cached"}
    after = results(env)
    assert len(after) == 8
    # Nothing computed twice: each result the first run left is a cache hit of the second
    # (not enqueued again), and a message of the first run handed to the second's worker
    # found its result stored and wrote nothing (seen by inode on a directory store; on S3
    # no stamp tells a rewrite from a hit's re-stamp, and the task's skip is the same code).
    status = {f"{r['key']}.png": r["status"] for r in rows.values()}
    assert {name: status[name] for name in before} == dict.fromkeys(before, "cached")
    assert all(after[name] == inode for name, inode in before.items())
    assert len(list(out.glob("*.png"))) == 8


def test_manifests_through_a_running_cluster(stack: LocalStack, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    write(images / "x.jpg", variant("car-1.jpg", (40, 40, 300, 300)))
    write(images / "y.png", variant("car-1.jpg", (60, 40, 320, 300), "PNG"))
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("id,path\nsku-1,imgs/x.jpg\n,imgs/y.png\n../evil,imgs/x.jpg\n")
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(
        json.dumps({"id": "p/9", "path": str(images / "y.png")}) + "\n"
        + json.dumps({"path": "imgs/x.jpg"}) + "\n"
    )  # fmt: skip
    settings: Settings = stack.settings
    opts = Options()
    failed = run_ingest(settings, str(csv_file), str(tmp_path / "o1"), "u2netp", opts, 2, None)
    assert failed == 1  # the ../evil id
    assert sorted(
        p.relative_to(tmp_path / "o1").as_posix() for p in (tmp_path / "o1").rglob("*.png")
    ) == [
        "imgs/y.png",
        "sku-1.png",
    ]
    assert not (tmp_path / "evil.png").exists()
    assert run_ingest(settings, str(jsonl), str(tmp_path / "o2"), "u2netp", opts, 2, None) == 0
    rows = [
        json.loads(line) for line in (tmp_path / "o2" / "bgq-report.jsonl").read_text().splitlines()
    ]
    assert [(r["id"], r["status"]) for r in rows] == [("p/9", "cached"), (None, "cached")]
    assert (tmp_path / "o2" / "p" / "9.png").is_file() and (
        tmp_path / "o2" / "imgs" / "x.png"
    ).is_file()
    client = redis.Redis.from_url(stack.url)
    assert client.llen(contract.QUEUE) == 0
    assert os.path.samefile(tmp_path / "o1" / "sku-1.png", tmp_path / "o2" / "imgs" / "x.png")


def test_a_filesystem_store_uploads_outputs_to_a_bucket(
    stack: LocalStack, s3_server: S3Server, tmp_path: Path
) -> None:
    src = write(tmp_path / "src" / "shoe.jpg", variant("car-1.jpg", (30, 30, 290, 230))).parent
    settings = stack.settings.model_copy(update={"s3_endpoint_url": s3_server.url})
    bucket = s3_server.bucket()
    report_file = tmp_path / "report.jsonl"
    opts = Options()
    assert run_ingest(settings, str(src), f"s3://{bucket}/out", "u2netp", opts, 2, report_file) == 0
    (row,) = [json.loads(line) for line in report_file.read_text().splitlines()]
    assert row["output"] == f"s3://{bucket}/out/shoe.png"
    uploaded = s3_server.client().get_object(Bucket=bucket, Key="out/shoe.png")
    assert uploaded["ContentType"] == "image/png"
    assert uploaded["Body"].read() == open_store(settings).read_output(row["key"] + ".png")


class Stop(Exception):
    """Ends a run that would otherwise wait for a worker forever."""


def _ingest_one(settings: Settings, tmp_path: Path, warnings: list[str], stop: bool) -> Ingest:
    src = write(tmp_path / "src" / "one.jpg", variant("plants-1.jpg", (5, 5, 305, 245))).parent

    def warn(message: str) -> None:
        warnings.append(message)
        if stop:
            raise Stop

    run = Ingest(settings, Folder(tmp_path / "out"), "u2netp", Options(), warn=warn)
    run.run(open_catalog(src, exclude=tmp_path / "out")[1])
    return run


@pytest.mark.parametrize(
    ("leaves", "words"),
    [
        # The entry of a worker that served the model when the run started (so it was not
        # refused) and whose process is gone: the entry lives on, nothing answers a ping.
        (False, "no worker is online; start one with `bgq worker`"),
        # The model's last worker in the bulk lane leaves once the job is sent.
        (True, "no live worker serves u2netp in the bulk lane; start one with "),
    ],
)
def test_a_stalled_run_says_so_when_no_worker_is_online(
    leaves: bool, words: str, tmp_path: Path, model_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(defaults, "INGEST_STALL_WARNING", 0.5)
    server = EmbeddedRedis.start(tmp_path / "redis")  # a broker of its own, no worker on it
    stand_in = StandInWorker(server.url, lanes=(contract.INTERACTIVE, contract.BULK))
    submit_data = Producer.submit_data

    def submit_then_leave(producer: Producer, *args: Any, **kwargs: Any) -> Job:
        job = submit_data(producer, *args, **kwargs)
        if leaves:
            stand_in.close()
        return job

    monkeypatch.setattr(Producer, "submit_data", submit_then_leave)
    try:
        settings = Settings(home=tmp_path / "home", redis_url=server.url, models_dir=model_home)
        warnings: list[str] = []
        with stand_in, pytest.raises(Stop):
            _ingest_one(settings, tmp_path, warnings, stop=True)
    finally:
        server.stop()
    assert words in warnings[0] and "1 jobs are waiting" in warnings[0]


def test_a_slow_queue_with_a_worker_online_is_not_a_stall(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(defaults, "INGEST_STALL_WARNING", 0.3)
    control = LocalStackControl(stack)
    control.pause()  # online and answering pings, but taking no job
    threading.Timer(2.0, control.resume).start()
    warnings: list[str] = []
    run = _ingest_one(stack.settings, tmp_path, warnings, stop=False)
    assert run.counts["done"] == 1 and warnings == []
