"""A Redis outage mid-ingest: ridden out when short, a clear failure then a resume when long.

A persistent redis-server (AOF, fsync every second, as deployments run it) that the tests kill
with SIGKILL and start again on the same port and data; real prefork workers; the real model.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from kombu.transport.redis import Channel

from bgq.contract import MASKS, TaskArgs, input_digest
from bgq.errors import BrokerError
from bgq.options import Options
from bgq.settings import Settings, settings_env
from bgq.stack import LocalStack
from bgq.store import FileStore, Store, open_store
from producer.outage import Outage
from tests.helpers import BGQ, Gate, bgq, pixels, variant, wait_for
from tests.redis_servers import Server, Servers

OUTAGE = 3.0  # seconds Redis stays down in the short outage
HELD = ("10.png", "11.png")  # the 3rd and 4th inputs (in name order): one per pool process


@pytest.fixture(scope="module")
def aof(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    group = Servers(tmp_path_factory.mktemp("aof"))
    try:
        yield group.start("aof", "--appendonly", "yes", "--appendfsync", "everysec")
    finally:
        group.stop()


@pytest.fixture(scope="module")
def workers(
    aof: Server, model_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("outage-home")
    settings = Settings(
        home=home,
        models_dir=model_home,
        concurrency=2,
        redis_url=f"redis://127.0.0.1:{aof.port}/0",
    )
    with LocalStack(settings, log=home / "worker.log") as stack:
        yield stack


def catalog(folder: Path, count: int, top: int) -> dict[str, bytes]:
    """`count` small new images as a folder to ingest; their bytes by output name."""
    folder.mkdir(parents=True)
    images = {}
    for i in range(count):
        data = variant("plants-1.jpg", (i * 9, top, i * 9 + 170, top + 150))
        (folder / f"{i}.jpg").write_bytes(data)
        images[f"{i}.png"] = data
    return images


def start_ingest(src: Path, out: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [BGQ, "ingest", str(src), "--out", str(out), "--window", "4"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()


def taken(url: str) -> set[str]:
    """The tasks whose messages a worker has taken and not acknowledged (kombu's hash)."""
    with redis.Redis.from_url(url) as client:
        entries = client.hvals(Channel.unacked_key)
    return {json.loads(entry)[0]["headers"]["id"] for entry in entries}


def check_outputs(out: Path, images: dict[str, bytes], reference: Callable[..., bytes]) -> None:
    assert sorted(p.name for p in out.glob("*.png")) == sorted(images)
    for name, data in images.items():
        mode, got = pixels(out / name)
        want_mode, want = pixels(reference(data))
        assert mode == want_mode and (got == want).all(), name


def hold(workers: LocalStack, images: dict[str, bytes]) -> tuple[Store, list[TaskArgs], list[Gate]]:
    """Gates that hold the HELD inputs' jobs at their stored-masks lookup: in a model run, past
    their Redis calls, one per pool process (so, with prefetch 1, the worker takes no other)."""
    store = open_store(workers.settings)
    assert isinstance(store, FileStore)
    held = [TaskArgs.build(input_digest(images[name]), "u2netp", Options()) for name in HELD]
    return store, held, [Gate(store.path(MASKS, args.masks)) for args in held]


def wait_held(workers: LocalStack, images: dict[str, bytes], gates: list[Gate]) -> None:
    """Until both pool processes are at their gates, holding the only messages taken."""
    for gate in gates:
        gate.wait_for_reader()
    keys = {name: job_key(data) for name, data in images.items()}
    assert taken(workers.url) & set(keys.values()) == {keys[name] for name in HELD}


def job_key(data: bytes) -> str:
    """The key of the default u2netp job of an input."""
    return TaskArgs.build(input_digest(data), "u2netp", Options()).key


def test_a_short_outage_mid_ingest_is_ridden_out(
    aof: Server,
    workers: LocalStack,
    env: dict[str, str],
    tmp_path: Path,
    reference: Callable[..., bytes],
) -> None:
    """Redis goes down for OUTAGE s while both pool processes are in a model run and other jobs
    are queued: the ingest says once that it is retrying, the running jobs finish after the
    restart, the queued ones run, and every output is rembg's.

    The jobs are held in their model run so that none starts while Redis is down: such a job
    fails for good today (see the next test), which is not yet promised.
    """
    env = {**env, **settings_env(workers.settings)}
    images = catalog(tmp_path / "in", 12, top=0)
    out = tmp_path / "out"
    _, _, gates = hold(workers, images)
    ingest = start_ingest(tmp_path / "in", out, env)
    try:
        wait_held(workers, images, gates)
        aof.kill()
        time.sleep(OUTAGE)  # the outage itself
        aof.start()
    finally:
        for gate in gates:
            gate.remove()  # end of file: no stored masks, so the held job runs the model
        stdout, stderr = finish(ingest)
    assert ingest.returncode == 0, stdout + stderr
    assert stderr.count("broker unreachable, retrying for up to 120 s") == 1, stderr
    assert "12 inputs" in stdout and "0 failed" in stdout, stdout
    check_outputs(out, images, reference)


def test_an_outage_past_the_budget_fails_then_a_rerun_resumes(
    aof: Server,
    workers: LocalStack,
    env: dict[str, str],
    tmp_path: Path,
    reference: Callable[..., bytes],
) -> None:
    """Redis goes down while both pool processes are in a model run and other jobs are queued;
    the ingest gives up after its budget; after the restart both jobs finish, and a rerun takes
    their results and finishes the rest.

    With both processes held (prefetch 1), the worker takes no job while Redis is down: a job
    that starts during an outage fails for good today (its retry cannot be published, so Celery
    rejects the message without requeue and the guard stays), which is not yet promised.
    """
    env = {**env, **settings_env(workers.settings), "BGQ_BROKER_RETRY_SECONDS": "3"}
    images = catalog(tmp_path / "in", 12, top=100)
    out = tmp_path / "out"
    store, held, gates = hold(workers, images)
    ingest = start_ingest(tmp_path / "in", out, env)
    try:
        wait_held(workers, images, gates)
        aof.kill()
        stdout, stderr = finish(ingest)  # Redis stays down until the ingest has given up
    finally:
        aof.start()
        for gate in gates:
            gate.remove()  # end of file: no stored masks, so the held job runs the model
    assert ingest.returncode == 1, stdout + stderr
    assert "broker unreachable, retrying for up to 3 s" in stderr
    assert re.search(r"^bgq: cannot (read job state|enqueue): .*refused", stderr, re.M), stderr
    wait_for(lambda: all(store.has_output(a.output) for a in held), what="the held jobs' results")
    rerun = bgq("ingest", str(tmp_path / "in"), "--out", str(out), env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "broker unreachable" not in rerun.stderr
    rows = [json.loads(line) for line in (out / "bgq-report.jsonl").read_text().splitlines()]
    statuses = {Path(r["source"]).with_suffix(".png").name: r["status"] for r in rows}
    assert [statuses[name] for name in HELD] == ["cached"] * len(HELD)
    check_outputs(out, images, reference)


# -- the retry policy itself (producer/outage.py), with operations that fail on purpose ------


def flaky(failures: int, error: Exception) -> Callable[[], str]:
    """An operation that raises `error` `failures` times, then answers "ok"."""
    left = [failures]

    def operation() -> str:
        if left[0] > 0:
            left[0] -= 1
            raise error
        return "ok"

    return operation


def test_retry_rides_out_an_outage_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage(budget=30)
    assert outage.call("read", flaky(0, redis.ConnectionError("refused"))) == "ok"
    with caplog.at_level(logging.INFO, logger="producer"):
        assert outage.call("read", flaky(4, redis.ConnectionError("refused"))) == "ok"
        assert outage.call("read", flaky(2, redis.TimeoutError("slow"))) == "ok"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["broker unreachable, retrying for up to 30 s"] * 2  # once per outage
    assert sum("reachable again" in r.getMessage() for r in caplog.records) == 2


def test_retry_gives_up_past_the_budget_with_the_usual_error() -> None:
    outage = Outage(budget=0.5)
    outage.call("read", flaky(0, redis.ConnectionError("refused")))
    started = time.monotonic()
    with pytest.raises(BrokerError, match=r"^cannot read job state: refused$"):
        outage.call("read job state", flaky(10**6, redis.ConnectionError("refused")))
    assert 0.5 <= time.monotonic() - started < 5


@pytest.mark.parametrize(
    "error",
    [redis.AuthenticationError("bad password"), redis.ResponseError("WRONGTYPE")],
)
def test_not_an_outage_fails_at_once(error: Exception) -> None:
    outage = Outage(budget=30)
    outage.call("read", flaky(0, error))
    operation = flaky(1, error)
    with pytest.raises(BrokerError):
        outage.call("read", operation)
    assert operation() == "ok"  # tried once only


def test_a_broker_never_reached_fails_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(BrokerError):
        Outage(budget=30).call("enqueue", flaky(1, redis.ConnectionError("refused")))
    assert time.monotonic() - started < 1


def test_the_api_answers_503_through_an_outage_and_recovers(
    aof: Server, workers: LocalStack
) -> None:
    """While Redis is down the API answers 503 with Retry-After, never 500 or a hang, and it
    serves again by itself once Redis is back."""
    from bgq import defaults
    from tests.helpers import ApiServer

    settings = workers.settings.model_copy(update={"redis_url": workers.url})
    api = ApiServer(settings).start()
    data = variant("car-1.jpg", (7, 7, 207, 157))
    try:
        with httpx.Client(base_url=api.url, timeout=60) as http:
            assert http.post("/v1/remove", content=data).status_code == 200
            aof.kill()
            try:
                started = time.monotonic()
                down = http.post("/v1/remove", content=variant("car-1.jpg", (8, 8, 208, 158)))
                # Its retry budget (5 s), not BGQ_BROKER_RETRY_SECONDS (120 s) nor a hang (the
                # client's 60 s): the slack is for a loaded machine, the figure is no benchmark.
                assert time.monotonic() - started < defaults.API_BROKER_RETRY_SECONDS + 30
                assert down.status_code == 503, down.text
                assert down.headers["retry-after"] == str(defaults.API_RETRY_AFTER)
                assert down.json()["error"]["code"] == "unavailable"
            finally:
                aof.start()
            wait_for(
                lambda: http.post("/v1/remove", content=data).status_code == 200,
                60,
                "the API to serve again",
            )
    finally:
        api.stop()
