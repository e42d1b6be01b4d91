"""Docs that cannot rot: every code block of README.md and docs/*.md runs here, or says why not.

Each block's fate is its marker (tests/docblocks.py). A group's `start` blocks bring up a real
stack as the docs do (`bgq up`, `bgq api`: real processes, an embedded Redis, the u2netp
model), its `run` blocks then run in order in one temporary folder, each with a bounded time,
and the stack is stopped. `skip-run` blocks (Docker, Kubernetes, a cloud bucket, cron, the
suite itself) and json/yaml/http blocks are checked for syntax.

What a block runs with, and the only changes made to its text:

- hosts and ports: `http://127.0.0.1:8000` and `http://bgq:8000` become the group's API on a free
  loopback port, as does `--port 8000`; image URLs (`https://cdn.example/NAME`,
  `https://shop.example/p/NAME`) become a loopback photo server serving the sample photos
  (`bench/photoserver.py`), so every stack runs with `BGQ_FETCH_ALLOW_PRIVATE=true`;
- paths: `.venv/bin/` becomes this venv's `bin/`, which also leads PATH (for plain `bgq`);
- files: the folder holds the files the examples name, made from `samples/`: photo.jpg,
  shoe.jpg, a.jpg, b.webp, a folder catalog/, products.csv and urls.csv; the buckets they name
  (`s3://photos`, `s3://shop`) are on the session's local S3 server (moto, bench/s3server.py),
  which BGQ_S3_ENDPOINT_URL points at;
- environment: BGQ_HOME (one per group) and BGQ_MODELS_DIR (the provisioned weights), nothing
  else of bgq's; `curl` is a wrapper that adds `--fail-with-body` unless the block says `-f`,
  so an HTTP error fails the block instead of printing a JSON error nobody reads.

Callback URLs are left as written: `shop.example` does not resolve, which the API accepts
(docs/service.md, webhooks). Output that other work may reword (CLI messages, the /docs page)
is not asserted: exit codes and the files the examples say they write are.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from bench.photoserver import PhotoServer
from bench.s3server import S3Server
from bgq import quotas
from bgq.process import free_port
from bgq.settings import Settings
from tests import docblocks
from tests.docblocks import Block
from tests.helpers import BGQ, ROOT, SAMPLES, processes_mentioning, wait_for

BLOCKS = docblocks.blocks()
GROUPS = sorted({b.group for b in BLOCKS if b.group})
BIN = Path(sys.executable).parent
BLOCK_TIMEOUT = 120  # seconds, any one block

# What each group's examples say they write, relative to its folder.
WRITES = {
    "cli": ["photo.out.png", "white.png", "cutouts"],
    "service": ["shoe.png", "white.png", "shoe.webp", "shoe-85.jpg", "a.png"],
}

CURL = """#!/bin/sh
# the docs tests' curl: an HTTP error answer fails the block (unless it asks for -f itself)
for a; do case $a in --fail|-[a-zA-Z]*f*) exec {curl} "$@";; esac; done
exec {curl} --fail-with-body "$@"
"""


def test_every_block_has_a_fate() -> None:
    """A new block with no marker, an unknown fence language or a fate missing its group or
    reason fails here: nothing in the docs goes unchecked by accident."""
    assert len(BLOCKS) >= 20
    assert docblocks.problems(BLOCKS) == []


def test_the_markers_are_read() -> None:
    found = docblocks._blocks_of(
        "x.md",
        "<!-- doc-test: skip-run reason=needs Docker -->\n\n```sh\ndocker compose up\n```\n"
        "```sh\nls\n```\n  <!-- doc-test: run group=g -->\n  ```python\n  1\n  ```\n",
    )
    assert [(b.line, b.fate, b.group, b.reason, b.text) for b in found] == [
        (3, "skip-run", None, "needs Docker", "docker compose up\n"),
        (6, None, None, None, "ls\n"),
        (10, "run", "g", None, "1\n"),
    ]
    assert len(docblocks.problems(found)) == 1  # the unmarked `ls`


def test_testing_md_counts_the_blocks() -> None:
    """docs/testing.md's count is the docs' own, so it cannot go stale either."""
    runnable = [b for b in BLOCKS if b.lang in docblocks.RUNNABLE]
    run = [b for b in runnable if b.fate != "skip-run"]
    text = (ROOT / "docs" / "testing.md").read_text()
    stated = re.search(r"\*\*(\d+) of the (\d+) shell and Python\s+blocks\*\*", text)
    assert stated, "docs/testing.md no longer states how many blocks run"
    assert (int(stated[1]), int(stated[2])) == (len(run), len(runnable))
    skipped = re.search(r"The (\d+) not run\s+here", text)
    assert skipped and int(skipped[1]) == len(runnable) - len(run)
    others = re.search(r"The other (\d+)\s+blocks", text)
    assert others and int(others[1]) == len(BLOCKS) - len(runnable)


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.fate == "skip-run"], ids=lambda b: b.where
)
def test_blocks_not_run_here_parse(block: Block) -> None:
    if block.lang == "python":
        compile(block.text, block.where, "exec")
    else:
        checked = subprocess.run(["bash", "-n"], input=block.text, text=True, capture_output=True)
        assert checked.returncode == 0, f"{block.where}: {checked.stderr}"


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.lang in {"json", "yaml", "http"}], ids=lambda b: b.where
)
def test_data_blocks_parse(block: Block) -> None:
    if block.lang == "json":
        json.loads(block.text)
    elif block.lang == "yaml":
        assert yaml.safe_load(block.text)
    else:
        head, _, body = block.text.partition("\n\n")
        status, *headers = head.splitlines()
        assert re.fullmatch(r"HTTP/1\.1 \d{3} [\w ]+", status), status
        assert all(re.fullmatch(r"[\w-]+: \S.*", h) for h in headers), headers
        json.loads(body)


@pytest.mark.parametrize("group", GROUPS)
def test_the_examples_run(
    group: str,
    model_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> None:
    """Start the group's servers as its `start` blocks say, run its blocks in reading order in
    one folder, check the files they say they write, stop everything."""
    members = [b for b in BLOCKS if b.group == group]
    folder = tmp_path_factory.mktemp(f"docs-{group}")
    photos = folder / "cdn"
    example_files(folder, photos)
    env = block_env(folder, model_home)
    buckets = None
    if any("s3://photos" in b.text for b in members):
        buckets = example_buckets(request.getfixturevalue("s3_server"))
        env["BGQ_S3_ENDPOINT_URL"] = buckets.url
    with PhotoServer(photos) as server, contextlib.ExitStack() as running:
        (folder / "urls.csv").write_text(f"id,url\nshoe,{server.url}/shoe.jpg\n")
        swap = substitutions(api=f"http://127.0.0.1:{free_port()}", photos=server.url)
        for block in members:
            text = substitute(block.text, swap)
            if block.fate == "start":
                running.enter_context(started(block, text, folder, env))
            elif block.fate == "env":
                check_settings(block, text, folder, env)
            else:
                run_block(block, text, folder, env)
    missing = [name for name in WRITES.get(group, []) if not (folder / name).exists()]
    assert not missing, f"the {group} examples did not write {missing}"
    if buckets is not None:
        written = buckets.client().list_objects_v2(Bucket="shop", Prefix="cutouts/")
        assert {o["Key"] for o in written.get("Contents", ())} == {
            "cutouts/car.png",
            "cutouts/shoes/anime.png",
        }


def example_buckets(server: S3Server) -> S3Server:
    """The buckets the examples name, on the session's S3 server: s3://photos/catalog/ holds
    the photos of catalog/, s3://shop is empty."""
    client = server.client()
    for bucket in ("photos", "shop"):
        client.create_bucket(Bucket=bucket)
        server.empty(bucket)
    car, anime = SAMPLES / "car-1.jpg", SAMPLES / "anime-girl-1.jpg"
    client.put_object(Bucket="photos", Key="catalog/car.jpg", Body=car.read_bytes())
    client.put_object(Bucket="photos", Key="catalog/shoes/anime.jpg", Body=anime.read_bytes())
    return server


def example_files(folder: Path, photos: Path) -> None:
    """The files the examples name, from samples/ (the smallest photos: the model runs on each);
    urls.csv is written once the photo server has its port."""
    car, anime = SAMPLES / "car-1.jpg", SAMPLES / "anime-girl-1.jpg"
    for name in ("photo.jpg", "shoe.jpg"):
        shutil.copy(car, folder / name)
    shutil.copy(anime, folder / "a.jpg")
    Image.open(car).save(folder / "b.webp", "WEBP")
    (folder / "catalog" / "shoes").mkdir(parents=True)
    shutil.copy(car, folder / "catalog" / "car.jpg")
    shutil.copy(anime, folder / "catalog" / "shoes" / "anime.jpg")
    (folder / "products.csv").write_text("id,path\ncar-1,photo.jpg\nanime-1,a.jpg\n")
    (photos / "p").mkdir(parents=True)
    shutil.copy(car, photos / "shoe.jpg")
    shutil.copy(car, photos / "p" / "123.jpg")


def block_env(folder: Path, model_home: Path) -> dict[str, str]:
    tools = folder / ".tools"
    tools.mkdir()
    curl = tools / "curl"
    curl.write_text(CURL.format(curl=shutil.which("curl")))
    curl.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BGQ_")}
    return {
        **clean,
        "PATH": f"{tools}:{BIN}:{os.environ['PATH']}",
        "BGQ_HOME": str(folder / "home"),
        "BGQ_MODELS_DIR": str(model_home),
        "BGQ_FETCH_ALLOW_PRIVATE": "true",
    }


def substitutions(api: str, photos: str) -> list[tuple[str, str]]:
    port = api.rsplit(":", 1)[1]
    return [
        (r"http://(127\.0\.0\.1|bgq):8000", api),
        (r"--port 8000\b", f"--port {port}"),
        (r"https://cdn\.example/", f"{photos}/"),
        (r"https://shop\.example/p/", f"{photos}/p/"),
        (r"(?<![\w/])\.venv/bin/", f"{BIN}/"),
    ]


def substitute(text: str, swap: list[tuple[str, str]]) -> str:
    for pattern, value in swap:
        text = re.sub(pattern, value, text)
    return text


def test_substitution_changes_only_hosts_ports_and_paths() -> None:
    swap = substitutions("http://127.0.0.1:4321", "http://127.0.0.1:999")
    text = (
        "curl http://bgq:8000/v1/remove 'http://127.0.0.1:8000/x?image_url=https://cdn.example/s.jpg'"
        " && bgq api --port 8000 && .venv/bin/bgq submit https://shop.example/p/1.jpg"
        " https://shop.example/hooks/bgq"
    )
    assert substitute(text, swap) == (
        "curl http://127.0.0.1:4321/v1/remove "
        "'http://127.0.0.1:4321/x?image_url=http://127.0.0.1:999/s.jpg'"
        f" && bgq api --port 4321 && {BIN}/bgq submit http://127.0.0.1:999/p/1.jpg"
        " https://shop.example/hooks/bgq"
    )


def run_block(block: Block, text: str, folder: Path, env: dict[str, str]) -> None:
    # bash -e: a failing line fails the block
    command = [sys.executable, "-c", text] if block.lang == "python" else ["bash", "-e", "-c", text]
    done = subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT
    )
    assert done.returncode == 0, (
        f"{block.where} failed (exit {done.returncode}):\n{text}\n"
        f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )


def check_settings(block: Block, text: str, folder: Path, env: dict[str, str]) -> None:
    """Run a block of variable assignments; bgq's settings must know and parse each BGQ_* one."""
    done = subprocess.run(
        ["bash", "-e", "-c", f"set -a\n{text}\nenv -0"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    assert done.returncode == 0, f"{block.where}: {done.stderr}"
    after = dict(item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)
    assigned = {k: v for k, v in after.items() if k.startswith("BGQ_") and env.get(k) != v}
    assert assigned, f"{block.where} sets no BGQ_* variable"
    for name, value in assigned.items():
        assert name.removeprefix("BGQ_").lower() in Settings.model_fields, name
        if name == "BGQ_API_LIMITS":
            assert quotas.parse_limits(value)


@contextlib.contextmanager
def started(block: Block, text: str, folder: Path, env: dict[str, str]) -> Iterator[None]:
    """Run a start block in its own process group until the group's examples are done; it is
    ready when every API it starts answers /readyz (a worker online), else when `bgq status`
    succeeds. Stopped with SIGTERM (as `bgq up` is by Ctrl-C or a service manager)."""
    log = folder / f"start-{block.line}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", text],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ports = re.findall(r"--port (\d+)", text)
        what = f"{block.where} to be ready (log: {log})"
        if ports:
            wait_for(lambda: all(ready(p) for p in ports), timeout=90, what=what)
        else:
            wait_for(lambda: bgq_status(folder, env), timeout=90, what=what)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        home = env["BGQ_HOME"]
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not processes_mentioning(home), timeout=60, what="the stack to stop")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert processes_mentioning(env["BGQ_HOME"]) == [], f"{block.where} left processes: {log}"


def ready(port: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    return False


def bgq_status(folder: Path, env: dict[str, str]) -> bool:
    done = subprocess.run([BGQ, "status"], cwd=folder, env=env, capture_output=True, timeout=60)
    return done.returncode == 0
