"""A job for a model that no live worker serves is refused at once (the API's 503, the CLI's
exit 2), a cached result is answered whatever the workers, and `bgq status` and the exporter
show the workers and jobs of each model: a real stack whose worker serves u2netp alone, real
Redis, capacity entries registered as workers register them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from bgq import contract, defaults, lanes
from bgq.contract import BULK, INPUTS, INTERACTIVE
from bgq.errors import ModelNotServed
from bgq.exporter import Exporter
from bgq.lane_stats import lane_stats
from bgq.lanes import Node, parse_entry, served_models
from bgq.options import Options
from bgq.redis_server import EmbeddedRedis
from bgq.settings import Settings
from bgq.stack import LocalStack
from producer import Producer
from producer.cli.services import model_lines
from producer.served import ServedModels, page_models
from tests.helpers import JPEG, StandInWorker, bgq, error_of, variant
from tests.test_ops import metric

WORDS = "model u2net: no live worker serves it (workers serve u2netp); start one with "
WORDS += "BGQ_MODELS=u2net or `bgq worker --models u2net`"

# -- the memo, the error and the page's list (pure) ---------------------------------------------


class Reads:
    """A stand-in for the workers' entries: one worker node per model served (in every lane,
    `lanes` says otherwise) and how often they were read."""

    def __init__(self, served: dict[str, int]) -> None:
        self.served = served
        self.lanes: dict[str, list[str]] = {}
        self.count = 0

    def __call__(self) -> dict[str, Node]:
        self.count += 1
        return {
            f"w-{model}": Node(self.lanes.get(model, list(contract.LANES)), processes, [model])
            for model, processes in self.served.items()
        }


@pytest.fixture
def memo() -> tuple[ServedModels, Reads, list[float]]:
    reads, now = Reads({"u2netp": 2}), [100.0]
    return ServedModels(reads, memo=1.0, clock=lambda: now[0]), reads, now


def test_a_served_model_is_read_once_a_second(
    memo: tuple[ServedModels, Reads, list[float]],
) -> None:
    served, reads, now = memo
    for _ in range(1000):
        served.require("u2netp")
    assert reads.count == 1
    now[0] += 0.99
    served.require("u2netp")
    assert reads.count == 1
    now[0] += 0.02  # the memo has aged: read again
    served.require("u2netp")
    assert reads.count == 2


def test_a_refusal_is_always_read_fresh(memo: tuple[ServedModels, Reads, list[float]]) -> None:
    served, reads, now = memo
    served.require("u2netp")
    with pytest.raises(ModelNotServed) as refused:
        served.require("u2net")
    assert str(refused.value) == WORDS and reads.count == 2
    reads.served["u2net"] = 1  # a worker of u2net starts: accepted at once, within the memo
    served.require("u2net")
    assert reads.count == 3
    # The memo errs only the other way: its last worker gone, u2net is still accepted until the
    # memo ages, then refused.
    del reads.served["u2net"]
    served.require("u2net")
    now[0] += 1.0
    with pytest.raises(ModelNotServed):
        served.require("u2net")


def test_a_model_is_served_per_lane(memo: tuple[ServedModels, Reads, list[float]]) -> None:
    """A worker of u2net in the interactive lane alone does not serve u2net's bulk jobs."""
    served, reads, _ = memo
    reads.served["u2net"] = 2
    reads.lanes["u2net"] = [INTERACTIVE]
    served.require("u2net", INTERACTIVE)
    with pytest.raises(ModelNotServed) as refused:
        served.require("u2net", BULK)
    assert str(refused.value) == (
        "model u2net: no live worker serves it in the bulk lane (its workers serve the "
        "interactive lane only); start one with `bgq worker --models u2net --lanes bulk`"
    )
    assert refused.value.lane == BULK
    served.require("u2netp", BULK)
    assert served.current() == {"u2netp": 2, "u2net": 2}


@pytest.mark.parametrize(
    ("entry", "node"),
    [
        ("ib:4:u2netp,u2net", Node([INTERACTIVE, BULK], 4, ["u2netp", "u2net"])),
        ("-:4:", Node([], 4, [])),  # webhooks only: no model, even with lanes added
        ("i:2:", Node([INTERACTIVE], 2, [])),
        ("ib:3", Node([INTERACTIVE, BULK], 3, [contract.BASE_MODEL])),  # an older release
    ],
)
def test_an_entry_serves_exactly_its_models(entry: str, node: Node) -> None:
    assert parse_entry(entry) == node
    for lane in contract.LANES:
        expected = dict.fromkeys(node.models, node.processes) if lane in node.lanes else {}
        assert served_models({"n": node}, lane) == expected
    assert "u2netp" not in served_models({"n": parse_entry("-:4:")})


def test_the_error_says_when_no_worker_is_live() -> None:
    error = ModelNotServed("u2net", [])
    assert str(error).startswith("model u2net: no live worker serves it (no worker is live); ")
    assert error.served == [] and error.model == "u2net"


def test_the_page_offers_the_served_models_default_first() -> None:
    served = {"u2net": 2, "u2netp": 4, "isnet-general-use": 1, "not-a-model": 1}
    assert page_models(served, "u2netp") == ["u2netp", "isnet-general-use", "u2net"]
    assert page_models(served, "silueta") == ["isnet-general-use", "u2net", "u2netp"]
    assert page_models({}, "u2netp") == []


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of its own, with no worker (the module's stack shares the test Redis)."""
    server = EmbeddedRedis.start(tmp_path / "redis")
    yield server.url
    server.stop()


# -- the API, the CLI: a stack whose worker serves u2netp alone ---------------------------------


def photo(i: int) -> bytes:
    """A photo no other test submits (its results are never cached by another)."""
    return variant("car-1.jpg", (7 + i, 3, 207 + i, 143))


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == str(defaults.API_MODEL_RETRY_AFTER)
    assert error_of(response) == {"code": "model_not_served", "message": WORDS}


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/remove"])
def test_the_api_refuses_a_model_no_worker_serves(
    route: str, base: str, api_stack: LocalStack, redis_client: redis.Redis
) -> None:
    data = photo(1 if route == "/v1/jobs" else 2)
    response = httpx.post(base + route, params={"model": "u2net"}, content=data, headers=JPEG)
    assert_refused(response)
    key = contract.cache_key(contract.input_digest(data), "u2net", Options())
    assert not redis_client.exists(contract.guard_key(key))  # nothing taken, nothing sent
    assert redis_client.llen(contract.image_queue(INTERACTIVE, "u2net")) == 0
    store = Producer(api_stack.settings).store
    assert store.stat(INPUTS, contract.input_digest(data)) is None  # not even stored
    # The same image for the model the worker serves is accepted.
    accepted = httpx.post(base + "/v1/jobs", content=data, headers=JPEG, timeout=60)
    assert accepted.status_code == 202, accepted.text


def test_a_cached_result_is_answered_whatever_the_workers(base: str, api_stack: LocalStack) -> None:
    data = photo(3)
    store = Producer(api_stack.settings).store
    key = contract.cache_key(contract.input_digest(data), "u2net", Options())
    store.put_output(contract.result_name(key, "png"), variant("car-1.jpg", (0, 0, 9, 9), "PNG"))
    job = httpx.post(base + "/v1/jobs", params={"model": "u2net"}, content=data, headers=JPEG)
    assert job.status_code == 202 and job.json()["cached"] is True and job.json()["id"] == key
    done = httpx.post(base + "/v1/remove", params={"model": "u2net"}, content=data, headers=JPEG)
    assert done.status_code == 200 and done.headers["x-bgq-cached"] == "true", done.text
    assert done.headers["x-bgq-job-id"] == key


def test_the_removebg_route_refuses_in_its_shape(serve: Callable[..., str]) -> None:
    api = serve(model="u2net")  # the remove.bg route runs the server's model
    response = httpx.post(api + "/v1.0/removebg", files={"image_file": ("a.jpg", photo(4))})
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == str(defaults.API_MODEL_RETRY_AFTER)
    assert response.json() == {"errors": [{"title": WORDS, "code": "model_not_served"}]}


def test_a_worker_that_starts_is_not_refused_for(own_redis: str, tmp_path: Path) -> None:
    """A producer that found u2net unserved accepts its jobs as soon as a worker serves it."""
    producer = Producer(Settings(home=tmp_path, redis_url=own_redis))
    client = redis.Redis.from_url(own_redis)
    with StandInWorker(own_redis, ("u2netp",)):
        with pytest.raises(ModelNotServed):
            producer.submit(photo(5), "u2net")
        with StandInWorker(own_redis, ("u2net",)):
            job = producer.submit(photo(5), "u2net")
    assert not job.cached and client.exists(contract.guard_key(job.key))
    assert client.llen(contract.image_queue(INTERACTIVE, "u2net")) == 1
    assert client.llen(contract.QUEUE) == 0
    client.close()


def test_a_job_needs_its_models_worker_in_its_lane(own_redis: str, tmp_path: Path) -> None:
    """Refused in a lane no worker of its model serves, and so is the promotion of a waiting
    bulk job by an interactive submit (its interactive copy would wait for nobody)."""
    producer = Producer(Settings(home=tmp_path, redis_url=own_redis))
    client = redis.Redis.from_url(own_redis)
    interactive_only = StandInWorker(own_redis, ("u2net",), (INTERACTIVE,))
    with interactive_only, pytest.raises(ModelNotServed, match="serves it in the bulk lane"):
        producer.submit(photo(7), "u2net", lane=BULK)
    with StandInWorker(own_redis, ("u2net",), (BULK,)):
        job = producer.submit(photo(7), "u2net", lane=BULK)
        with pytest.raises(ModelNotServed, match="serves it in the interactive lane"):
            producer.submit(photo(7), "u2net")
    assert client.exists(contract.guard_key(job.key))
    assert client.llen(contract.image_queue(INTERACTIVE, "u2net")) == 0
    client.close()


def test_a_webhooks_only_worker_serves_no_model(own_redis: str, tmp_path: Path) -> None:
    """Its entry as it registers it (`-:4:`): no model, in `bgq status` as in the refusal."""
    producer = Producer(Settings(home=tmp_path, redis_url=own_redis))
    client = redis.Redis.from_url(own_redis)
    with StandInWorker(own_redis, (), (), 4, "hooks@h"):
        assert lane_stats(client, 1.0).workers["hooks@h"] == Node([], 4, [])
        with pytest.raises(ModelNotServed, match=r"\(no worker is live\)"):
            producer.submit(photo(8), contract.BASE_MODEL)
    client.close()


@pytest.mark.parametrize("command", ["submit", "ingest"])
def test_submit_and_ingest_exit_2_with_the_words(
    command: str, api_stack: LocalStack, env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "car.jpg").write_bytes(photo(6))
    env = {**env, "BGQ_REDIS_URL": api_stack.url, "BGQ_HOME": str(api_stack.settings.home)}
    if command == "submit":
        args = ["submit", str(folder / "car.jpg"), "--model", "u2net"]
    else:
        args = ["ingest", str(folder), "--out", str(tmp_path / "out"), "--model", "u2net"]
    done = bgq(*args, env=env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip().endswith(f"bgq: {WORDS}"), done.stderr


# -- bgq status and the exporter, per model ------------------------------------------------------


def message(model: str) -> bytes:
    """A kombu message of a job for `model`, as a producer publishes it."""
    headers = {"id": model, "task": contract.TASK_NAME, contract.ENQUEUED_HEADER: 1.0}
    headers[contract.MODEL_HEADER] = model
    return json.dumps({"body": "e30=", "headers": headers, "properties": {}}).encode()


@pytest.fixture
def two_models(own_redis: str) -> Iterator[tuple[redis.Redis, str]]:
    """Workers registered as they register (renewed while the test runs): one serving u2netp
    and u2net (3 processes), one u2netp (2); jobs waiting for u2net in both lanes, and for
    silueta, which no worker serves; one u2net job held."""
    redis_client = redis.Redis.from_url(own_redis)
    both = StandInWorker(own_redis, ("u2netp", "u2net"), (INTERACTIVE, BULK), 3, "a@h").start()
    one = StandInWorker(own_redis, ("u2netp",), (INTERACTIVE,), 2, "b@h").start()
    queue = contract.image_queue
    redis_client.lpush(queue(INTERACTIVE, "u2net"), message("u2net"), message("u2net"))
    redis_client.lpush(queue(BULK, "u2net"), message("u2net"))
    redis_client.lpush(queue(INTERACTIVE, "silueta"), message("silueta"))
    redis_client.lpush(contract.QUEUE, message("u2netp"))
    held = [json.loads(message("u2net")), "", queue(INTERACTIVE, "u2net")]
    redis_client.hset("unacked", "tag-1", json.dumps(held))
    yield redis_client, own_redis
    both.close()
    one.close()
    redis_client.close()


def test_lanes_sum_every_models_queues(two_models: tuple[redis.Redis, str]) -> None:
    snapshot = lane_stats(two_models[0], 10.0)
    assert (snapshot.lanes[INTERACTIVE].waiting, snapshot.lanes[BULK].waiting) == (4, 1)
    assert snapshot.lanes[INTERACTIVE].running == 1
    assert snapshot.lanes[INTERACTIVE].oldest == 9.0
    u2net, u2netp, silueta = (snapshot.models[m] for m in ("u2net", "u2netp", "silueta"))
    assert (u2net.workers, u2net.processes) == (1, 3)
    assert (u2net.waiting, u2net.running) == ({INTERACTIVE: 2, BULK: 1}, {INTERACTIVE: 1, BULK: 0})
    assert (u2netp.workers, u2netp.processes, u2netp.waiting[INTERACTIVE]) == (2, 5, 1)
    assert (silueta.workers, silueta.waiting[INTERACTIVE]) == (0, 1)
    assert model_lines(snapshot) == [
        "models:      silueta: 0 workers, 0 pool processes; 1 waiting (1 interactive, 0 bulk), "
        "0 running (no live worker serves silueta: start one with BGQ_MODELS=silueta)",
        "             u2net: 1 worker, 3 pool processes; 3 waiting (2 interactive, 1 bulk), "
        "1 running",
        "             u2netp: 2 workers, 5 pool processes; 1 waiting (1 interactive, 0 bulk), "
        "0 running",
    ]


def test_status_and_exporter_per_model(
    two_models: tuple[redis.Redis, str], env: dict[str, str], tmp_path: Path
) -> None:
    url = two_models[1]
    env = {**env, "BGQ_REDIS_URL": url}
    shown = bgq("status", "--json", env=env)
    assert shown.returncode == 1, shown.stderr  # no worker answers a ping: these are entries
    models = json.loads(shown.stdout)["models"]
    assert set(models) == defaults.MODELS
    assert models["u2net"] == {
        "workers": 1,
        "pool_processes": 3,
        "waiting": {INTERACTIVE: 2, BULK: 1},
        "running": {INTERACTIVE: 1, BULK: 0},
    }
    assert json.loads(shown.stdout)["lanes"][INTERACTIVE]["waiting"] == 4
    # Queue depths: u2netp's queues, and those of the models with jobs or workers, no others.
    queues = {"bgq": 1, "bgq.bulk": 0, "bgq@u2net": 2, "bgq.bulk@u2net": 1}
    queues |= {"bgq@silueta": 1, "bgq.bulk@silueta": 0}
    assert json.loads(shown.stdout)["queues"] == queues
    text = bgq("status", env=env).stdout
    assert "(no live worker serves silueta: start one with BGQ_MODELS=silueta)" in text
    assert "queue depth: 1 (bgq), 0 (bgq.bulk), 1 (bgq@silueta), 0 (bgq.bulk@silueta), " in text

    settings = Settings(home=tmp_path, redis_url=url)
    exporter = Exporter(settings, "127.0.0.1", 0)
    try:
        scraped = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics").text
    finally:
        exporter.stop()
    assert metric(scraped, "bgq_model_waiting", 'lane="interactive",model="u2net"') == 2
    for queue, depth in queues.items():
        assert metric(scraped, "bgq_queue_depth", f'queue="{queue}"') == depth
    assert 'queue="bgq@isnet-general-use"' not in scraped
    assert metric(scraped, "bgq_model_waiting", 'lane="bulk",model="u2net"') == 1
    assert metric(scraped, "bgq_model_running", 'lane="interactive",model="u2net"') == 1
    assert metric(scraped, "bgq_model_workers", 'model="u2netp"') == 2
    assert metric(scraped, "bgq_model_pool_processes", 'model="u2net"') == 3
    assert 'bgq_model_workers{model="silueta"} 0.0' in scraped.splitlines()
    assert metric(scraped, "bgq_lane_waiting", 'lane="interactive"') == 4  # unchanged names


def test_a_runs_jobs_count_under_its_model(two_models: tuple[redis.Redis, str]) -> None:
    """Jobs still in their bulk runs' lists count under the model of each list's oldest job,
    in `bgq status` and in the exporter's bgq_model_waiting (what a per-model KEDA query reads)."""
    client, url = two_models
    client.lpush(contract.run_queue("catalog"), *[message("u2net")] * 3)
    client.lpush(contract.run_queue("mixed"), message("u2netp"), message("u2net"))  # tail: u2netp
    client.rpush(lanes.RING_KEY, "catalog", "mixed")
    snapshot = lane_stats(client, 10.0)
    assert snapshot.runs == {"catalog": 3, "mixed": 2}
    assert snapshot.models["u2net"].waiting == {INTERACTIVE: 2, BULK: 1 + 3}
    assert snapshot.models["u2netp"].waiting == {INTERACTIVE: 1, BULK: 2}
    assert snapshot.lanes[BULK].waiting == 1 + 3 + 2
    exporter = Exporter(Settings(redis_url=url), "127.0.0.1", 0)
    try:
        scraped = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics").text
    finally:
        exporter.stop()
    assert metric(scraped, "bgq_model_waiting", 'lane="bulk",model="u2net"') == 4
