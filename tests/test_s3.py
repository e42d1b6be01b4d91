"""What only the S3 store does: nothing shared but Redis and the bucket, buckets as ingest's
source and destination, presigned results, start-up checks, and an S3 outage mid-ingest."""

from __future__ import annotations

import functools
import io
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from PIL import Image

from bench.s3server import S3Server
from bgq.contract import RESULTS
from bgq.errors import ConfigError
from bgq.process import free_port
from bgq.settings import Settings
from bgq.stack import LocalStack
from bgq.store import open_store
from producer import Producer
from producer.remote import S3Prefix
from tests.helpers import BGQ, ApiServer, bgq, bgq_in_process, pixels, variant, wait_for
from tests.stacks import StackFactory, s3_settings


@pytest.fixture(scope="module")
def store_kind() -> str:
    return "s3"


def s3_env(stack: LocalStack, env: dict[str, str]) -> dict[str, str]:
    """A command's environment on the stack's Redis and bucket."""
    settings = stack.settings
    return {
        **env,
        "BGQ_REDIS_URL": stack.url,
        "BGQ_STORE_URL": str(settings.store_url),
        "BGQ_S3_ENDPOINT_URL": str(settings.s3_endpoint_url),
    }


def keys(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", ()))


def test_nothing_is_shared_but_redis_and_the_bucket(
    stack: LocalStack, tmp_path: Path, reference: Callable[..., bytes]
) -> None:
    """Workers, a producer and an API, each with its own BGQ_HOME: no store file anywhere."""
    producer = Producer(stack.settings.model_copy(update={"home": tmp_path / "producer"}))
    data = variant("anime-girl-1.jpg", (20, 20, 420, 420))
    job = producer.submit(data)
    assert isinstance(job.wait(timeout=120), str)  # the result's s3:// URL
    assert (pixels(job.read())[1] == pixels(reference(data))[1]).all()
    job.save(tmp_path / "out" / "x.png")
    assert (tmp_path / "out" / "x.png").read_bytes() == job.read()
    api_settings = stack.settings.model_copy(
        update={"home": tmp_path / "api", "redis_url": stack.url}
    )
    api = ApiServer(api_settings).start()
    try:
        got = httpx.get(f"{api.url}/v1/jobs/{job.key}/result", timeout=30)
        assert got.status_code == 200 and got.content == job.read()
        posted = httpx.post(f"{api.url}/v1/remove", content=data, timeout=60)
        assert posted.headers["x-bgq-cached"] == "true" and posted.content == job.read()
    finally:
        api.stop()
    for home in (stack.settings.home, tmp_path / "producer", tmp_path / "api"):
        assert not (home / "store").exists(), f"a store directory appeared under {home}"


def test_presigned_result_redirect(stack: LocalStack) -> None:
    producer = Producer(stack.settings)
    job = producer.submit(variant("car-1.jpg", (0, 0, 260, 200)))
    png = job.read(timeout=120)
    settings = stack.settings.model_copy(
        update={"redis_url": stack.url, "result_redirect": "presigned", "presign_seconds": 60}
    )
    api = ApiServer(settings).start()
    try:
        asked = time.time()
        answer = httpx.get(f"{api.url}/v1/jobs/{job.key}/result", timeout=30)
        answered = time.time()
        assert answer.status_code == 307
        location = answer.headers["location"]
        query = dict(parse_qsl(urlsplit(location).query))
        if "X-Amz-Expires" in query:  # SigV4: the lifetime itself
            assert query["X-Amz-Expires"] == "60", location
        else:  # SigV2, what botocore signs with for this endpoint: int(signing time + 60)
            assert int(asked) + 60 <= int(query["Expires"]) <= int(answered) + 60, location
        assert httpx.get(location, timeout=30).content == png  # the bucket serves the bytes
    finally:
        api.stop()


def test_ingest_from_a_bucket_into_a_bucket_and_resume(
    stack: LocalStack, s3_server: S3Server, env: dict[str, str], reference: Callable[..., bytes]
) -> None:
    client, source, dest = s3_server.client(), s3_server.bucket(), s3_server.bucket()
    inputs = {
        "catalog/shoes/1.jpg": variant("car-1.jpg", (0, 0, 300, 220)),
        "catalog/shoes/2.png": variant("cloth-1.jpg", (0, 0, 280, 400), "PNG"),
        "catalog/a.jpg": variant("anime-girl-1.jpg", (0, 0, 300, 300)),
        "catalog/notes.txt": b"not an image",
        "catalog/.hidden/x.jpg": b"skipped",
    }
    for key, data in inputs.items():
        client.put_object(Bucket=source, Key=key, Body=data)
    env = s3_env(stack, env)
    args = ("ingest", f"s3://{source}/catalog", "--out", f"s3://{dest}/cutouts")
    first = bgq(*args, "--report", str(Path(env["BGQ_HOME"]) / "r1.jsonl"), env=env, timeout=300)
    assert first.returncode == 1, first.stdout + first.stderr  # notes.txt is not an image
    assert "3 done, 0 cached, 1 failed" in first.stdout
    assert f"FAILED s3://{source}/catalog/notes.txt" in first.stdout
    made = keys(s3_server, dest)
    assert made == ["cutouts/a.png", "cutouts/shoes/1.png", "cutouts/shoes/2.png"]
    got = client.get_object(Bucket=dest, Key="cutouts/a.png")["Body"].read()
    want = reference(inputs["catalog/a.jpg"])
    assert (pixels(got)[1] == pixels(want)[1]).all()
    again = bgq(*args, "--report", str(Path(env["BGQ_HOME"]) / "r2.jsonl"), env=env, timeout=120)
    assert "0 done, 3 cached, 1 failed" in again.stdout, again.stdout + again.stderr
    assert keys(s3_server, dest) == made


def test_a_bucket_catalog_mirrors_names_and_skips_its_own_outputs(
    s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.bucket()
    for key in ("c/a.jpg", "c/a.webp", "c/x/b.jpg", "c/.git/y", "c/out/a.png", "other/z.jpg"):
        s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"x")
    settings = Settings(home=tmp_path, s3_endpoint_url=s3_server.url)
    total, items = S3Prefix(settings, f"s3://{bucket}/c").catalog(f"s3://{bucket}/c/out")
    assert total == 3
    assert [(i.source, i.output) for i in items] == [
        (f"s3://{bucket}/c/a.jpg", "a.jpg.png"),
        (f"s3://{bucket}/c/a.webp", "a.webp.png"),
        (f"s3://{bucket}/c/x/b.jpg", "x/b.png"),
    ]
    for outside in (f"s3://{bucket}", f"s3://{bucket}/c", f"s3://{bucket}/other"):
        assert S3Prefix(settings, f"s3://{bucket}/c").catalog(outside)[0] == 4  # none excluded


def test_ingest_from_an_s3_store_into_a_folder(
    stack: LocalStack, env: dict[str, str], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "p.jpg").write_bytes(variant("plants-1.jpg", (0, 0, 300, 300), "PNG"))
    result = bgq("ingest", str(src), "--out", str(tmp_path / "out"), env=s3_env(stack, env))
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out" / "p.png"
    assert pixels(out)[0] == "RGBA" and out.stat().st_nlink == 1  # a download, not a link


def failing_start(env: dict[str, str], words: list[str], real: bool = False) -> None:
    """Each command refused at start (exit 2, one line with `words`); `real`: in `bgq`
    processes, else in this one."""
    run = functools.partial(bgq, timeout=120) if real else bgq_in_process
    for command in (["status"], ["worker"], ["api", "--port", "0"]):
        result = run(*command, env=env)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in words), (command, lines)
        assert env["AWS_SECRET_ACCESS_KEY"] not in result.stderr


def test_start_checks_name_the_setting(
    stack: LocalStack, env: dict[str, str], tmp_path: Path
) -> None:
    env = {**s3_env(stack, env), **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")}}
    no_bucket = {**env, "BGQ_STORE_URL": "s3://no-such-bucket/x"}
    failing_start(no_bucket, ["BGQ_STORE_URL", "exist"], real=True)
    closed = f"http://127.0.0.1:{free_port()}"
    failing_start({**env, "BGQ_S3_ENDPOINT_URL": closed}, ["BGQ_S3_ENDPOINT_URL", "unreachable"])
    strict = S3Server(tmp_path / "strict.log", INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        failing_start(
            {**env, "BGQ_S3_ENDPOINT_URL": strict.url}, ["access refused", "AWS_ACCESS_KEY_ID"]
        )
        # At run time too, refused credentials and a missing bucket are permanent (no retry).
        refused = open_store(
            Settings(home=tmp_path, store_url="s3://b/x", s3_endpoint_url=strict.url)
        )
        with pytest.raises(ConfigError, match="access refused"):
            refused.read_input("ab" * 32)
    finally:
        strict.stop()
    missing = open_store(
        Settings(
            home=tmp_path,
            store_url="s3://no-such-bucket/x",
            s3_endpoint_url=env["BGQ_S3_ENDPOINT_URL"],
        )
    )
    with pytest.raises(ConfigError, match="does not exist"):
        missing.put_output("ab" * 32, b"png")


def test_an_unreachable_endpoint_is_a_transient_error(tmp_path: Path) -> None:
    from bgq.errors import StoreError

    settings = Settings(
        home=tmp_path,
        store_url="s3://bucket/x",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
        s3_timeout=1,
    )
    store = open_store(settings)
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot"):
        store.put_output("ab" * 32, b"png")
    assert time.monotonic() - started < 60  # bounded retries


def test_cache_stats_prune_and_exporter_on_the_bucket(
    stack: LocalStack, env: dict[str, str]
) -> None:
    from bgq.exporter import Exporter

    job = Producer(stack.settings).submit(variant("car-1.jpg", (3, 3, 203, 153)))
    job.wait(timeout=120)
    env = s3_env(stack, env)
    stats = bgq("cache", "stats", env=env)
    assert stats.returncode == 0, stats.stderr
    assert f"store:    {stack.settings.store_url}/" in stats.stdout
    assert "results:  0 " not in stats.stdout

    # The module's earlier results may be over a minute old (a loaded machine): they go, the
    # one just used stays (prune spares what was used in the last minute). Later tests in
    # this module use a bucket of their own.
    def count(pattern: str, out: str) -> int:
        found = re.search(pattern, out)
        assert found, out
        return int(found[1])

    before = len(list(open_store(stack.settings).scan(RESULTS)))
    dry = bgq("cache", "prune", "--max-age", "0s", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert count(r": (\d+) used in the last minute", dry.stdout) >= 1  # at least the one used
    would = count(r"would remove (\d+) result", dry.stdout)
    assert len(list(open_store(stack.settings).scan(RESULTS))) == before  # a dry run
    pruned = bgq("cache", "prune", "--max-age", "0s", env=env)
    assert pruned.returncode == 0, pruned.stderr
    removed = count(r"removed (\d+) result", pruned.stdout)
    assert removed >= would  # more may have turned a minute old since the dry run
    assert len(list(open_store(stack.settings).scan(RESULTS))) == before - removed
    assert open_store(stack.settings).has_output(job.output)
    exporter = Exporter(stack.settings.model_copy(update={"redis_url": stack.url}), "127.0.0.1", 0)
    try:
        exporter.wait_for_scan()
        page = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=10).text
    finally:
        exporter.stop()
    count = len(list(open_store(stack.settings).scan(RESULTS)))
    assert f'bgq_store_entries{{kind="results"}} {float(count)}' in page


def test_store_url_forms(tmp_path: Path) -> None:
    assert Settings(home=tmp_path).store_bucket is None
    assert Settings(home=tmp_path, store_url=str(tmp_path / "s")).store_dir == tmp_path / "s"
    as_file = Settings(home=tmp_path, store_url=f"file://{tmp_path}/f")
    assert as_file.store_dir == tmp_path / "f" and open_store(as_file).url == str(tmp_path / "f")
    assert Settings(home=tmp_path, store_url="s3://b").store_bucket == ("b", "")
    assert Settings(home=tmp_path, store_url="s3://b/p/q/").store_bucket == ("b", "p/q/")


def abandoned_requests(port: int) -> set[str]:
    """Connections to the server on `port` whose client hung up with its request unread: the
    server's side in CLOSE_WAIT with bytes in its receive queue (Linux's /proc/net/tcp), what
    a request to a frozen server leaves once its client timed out. Their clients' addresses."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, client, state, queues = line.split()[1:5]
        unread = int(queues.split(":")[1], 16)
        if int(local.split(":")[1], 16) == port and state == "08" and unread:
            found.add(client)
    return found


def test_an_s3_outage_mid_ingest_is_ridden_out(
    make_stack: StackFactory,
    s3_server: S3Server,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Last in the module: its stack (a bucket of its own, short S3 timeouts) replaces the
    module's."""
    stack = make_stack(s3_timeout=2, **s3_settings(s3_server))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"{i}.jpg").write_bytes(variant("cloth-1.jpg", (i * 9, 0, 300 + i * 9, 400)))
    env = {**s3_env(stack, env), "BGQ_S3_TIMEOUT": "2"}
    report = tmp_path / "out" / "bgq-report.jsonl"
    with subprocess.Popen(
        [BGQ, "ingest", str(src), "--out", str(tmp_path / "out"), "--window", "4"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as run:
        wait_for(lambda: report.is_file() and report.read_text().count("\n") >= 2, 120, "2 done")
        before = abandoned_requests(s3_server.port)
        with s3_server.paused():  # until a request to the frozen server has timed out
            wait_for(lambda: abandoned_requests(s3_server.port) - before, 60, "an S3 timeout")
        out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    assert "10 done" in out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        f"{i}.png" for i in range(10)
    ]
    store = open_store(stack.settings)
    assert len(list(store.scan(RESULTS))) == 10
    for png in (tmp_path / "out").glob("*.png"):
        Image.open(io.BytesIO(png.read_bytes())).verify()
