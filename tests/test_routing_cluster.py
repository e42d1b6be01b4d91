"""A two-model cluster: one real prefork worker per model (u2netp, u2net) on one Redis and one
store. Each job runs on the worker that serves its model, in both lanes; each pool process
holds only its own model's session; a job found in another model's queue (a rolling upgrade)
is handed on to its own model's queue, not run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import redis

from bgq import contract, lanes
from bgq.contract import TaskArgs
from bgq.options import Options
from bgq.settings import Settings
from bgq.stack import LocalStack
from producer import Producer, enqueue
from tests.helpers import settle, stats, variant, wait_for

P, N, S = "u2netp", "u2net", "silueta"  # S: a model no worker serves
MiB = 2**20
# u2net's session holds its 168 MiB of weights (u2netp's: 4.4) and larger activations: a pool
# process of the u2netp-only worker stays well below one of the u2net worker (measured: 305
# against 479 MiB, the heap trimmed after loading), and would not if it held a u2net session too.
SESSION_MARGIN = 150 * MiB


@dataclass
class Cluster:
    workers: dict[str, LocalStack]  # by the model each serves
    producer: Producer
    client: redis.Redis
    root: Path


@pytest.fixture(scope="module")
def cluster(
    redis_url: str, u2net_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("routing")
    client = redis.Redis.from_url(redis_url)
    client.flushdb()

    def settings(name: str, **extra: object) -> Settings:
        return Settings(
            home=root / name,
            redis_url=redis_url,
            models_dir=u2net_weights,
            store_url=str(root / "store"),
            concurrency=1,
            **extra,  # type: ignore[arg-type]
        )

    workers: dict[str, LocalStack] = {}
    try:
        for model in (P, N):
            stack = LocalStack(settings(model, models=model), log=root / f"{model}.log")
            workers[model] = stack.start()
        with Producer(settings("producer")) as producer:
            yield Cluster(workers, producer, client, root)
    finally:
        for stack in workers.values():
            stack.stop()
        client.flushdb()
        client.close()


def ran_on(cluster: Cluster, key: str) -> list[str]:
    """The models whose worker logged this job's success (each worker logs to its own file).
    Celery logs it just after it stores the job's state: wait for the line, within a bound."""
    done = f"Task {contract.TASK_NAME}[{key}] succeeded"

    def found() -> list[str]:
        return [m for m, s in cluster.workers.items() if s.log and done in s.log.read_text()]

    wait_for(found, timeout=30, what=f"a worker to log the success of {key}")
    return found()


def photo(i: int) -> bytes:
    return variant("car-1.jpg", (10 * i, 8 * i, 10 * i + 240, 8 * i + 180))


def test_each_job_runs_on_a_worker_of_its_model_in_both_lanes(cluster: Cluster) -> None:
    nodes = lanes.capacity(cluster.client)
    assert sorted(node.models for node in nodes.values()) == [[N], [P]]
    assert lanes.served_models(nodes) == {P: 1, N: 1}
    jobs = {
        (model, lane): cluster.producer.submit(photo(i), model=model, lane=lane)
        for i, (model, lane) in enumerate((m, lane) for m in (P, N) for lane in contract.LANES)
    }
    for job in jobs.values():
        job.wait(timeout=240)
    assert {where: ran_on(cluster, job.key) for where, job in jobs.items()} == {
        where: [where[0]] for where in jobs
    }


def rss(stack: LocalStack) -> int:
    """The resident memory of a worker's one pool process."""
    assert stack.worker is not None
    [pool] = psutil.Process(stack.worker.pid).children()
    return int(pool.memory_info().rss)


def test_a_pool_process_holds_only_its_own_models_session(cluster: Cluster) -> None:
    for i, model in enumerate((P, N)):
        cluster.producer.submit(photo(10 + i), model=model).wait(timeout=240)
    sizes = {model: rss(stack) for model, stack in cluster.workers.items()}
    print(f"pool process RSS: u2netp {sizes[P] / MiB:.0f} MiB, u2net {sizes[N] / MiB:.0f} MiB")
    assert sizes[P] + SESSION_MARGIN < sizes[N], sizes


def outcomes(client: redis.Redis) -> int:
    counted = stats(client)
    return sum(counted.get(outcome, 0) for outcome in contract.OUTCOMES)


def log_of(cluster: Cluster, model: str) -> str:
    log = cluster.workers[model].log
    assert log is not None
    return log.read_text()


@pytest.mark.parametrize("old_queue", [contract.QUEUE, contract.BULK_QUEUE])
def test_a_job_in_another_models_queue_is_handed_on_not_run(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, old_queue: str
) -> None:
    """A u2net job in `bgq` (a producer from before routing by model) or in `bgq.bulk` (an old
    worker's scheduler) is handed on by the u2netp worker to u2net's queue of its lane, and
    runs on the u2net worker, counted once."""
    lane = contract.BULK if old_queue == contract.BULK_QUEUE else contract.INTERACTIVE
    target = contract.image_queue(lane, N)
    before = outcomes(cluster.client)
    monkeypatch.setattr(contract, "image_queue", lambda lane, model: old_queue)
    job = cluster.producer.submit(photo(20 + len(old_queue)), model=N)
    job.wait(timeout=240)
    settle(cluster.client, job.key)
    assert ran_on(cluster, job.key) == [N]
    assert f"handed job {job.key} on to {target}" in log_of(cluster, P)
    assert outcomes(cluster.client) == before + 1


def test_a_job_of_a_model_nobody_serves_is_handed_on_to_wait_in_its_queue(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handed on even when no live worker serves its model: it waits in that model's queue,
    with its guard token, uncounted."""
    target = contract.image_queue(contract.INTERACTIVE, S)
    before = outcomes(cluster.client)
    monkeypatch.setattr(contract, "image_queue", lambda lane, model: contract.QUEUE)
    args = TaskArgs.build(contract.input_digest(photo(30)), S, Options())
    token = lanes.guard_token(contract.INTERACTIVE, "handed-on")
    app = cluster.producer.app
    assert enqueue.publish(app, args, token, contract.INTERACTIVE, "r", True, 0) is None
    try:
        wait_for(lambda: cluster.client.llen(target), timeout=30, what=f"a message in {target}")
        [raw] = cluster.client.lrange(target, 0, -1)
        headers = json.loads(raw)["headers"]
        assert (headers["id"], headers[contract.GUARD_HEADER]) == (args.key, token)
        assert headers[contract.MODEL_HEADER] == S
        assert not cluster.client.llen(contract.QUEUE)
        assert f"handed job {args.key} on to {target}" in log_of(cluster, P)
        assert outcomes(cluster.client) == before
    finally:
        cluster.client.delete(target, contract.guard_key(args.key))
