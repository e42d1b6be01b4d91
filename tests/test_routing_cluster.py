"""A two-model cluster: one real prefork worker per model (u2netp, u2net) on one Redis and one
store. Each job runs on the worker that serves its model, in both lanes; each pool process
holds only its own model's session; a job from before routing by model still runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import redis

from bgq import contract, lanes
from bgq.settings import Settings
from bgq.stack import LocalStack
from producer import Producer
from tests.helpers import variant

P, N = "u2netp", "u2net"
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
    """The models whose worker logged this job's success (each worker logs to its own file)."""
    done = f"Task {contract.TASK_NAME}[{key}] succeeded"
    return [m for m, s in cluster.workers.items() if s.log and done in s.log.read_text()]


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


def test_a_job_queued_before_routing_still_runs_with_a_warning(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A u2net job in `bgq` (published by a producer from before routing by model) is taken by
    the u2netp worker, which loads u2net for it and says so."""
    monkeypatch.setattr(contract, "image_queue", lambda lane, model: contract.QUEUE)
    job = cluster.producer.submit(photo(20), model=N)
    job.wait(timeout=240)
    assert ran_on(cluster, job.key) == [P]
    log = cluster.workers[P].log
    assert log is not None and f"a job for model {N}, which this worker does not serve" in (
        log.read_text()
    )
