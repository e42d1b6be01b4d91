"""Docs that cannot rot: every code block of README.md, docs/*.md and deploy/README.md runs
here, or says why not.

Each block's fate is its marker (tests/docblocks.py). A group's `start` blocks bring up a real
stack as the docs do (`bgq up`, `bgq api`: real processes, an embedded Redis, the u2netp
model), its `run` blocks then run in order in one temporary folder, each with a bounded time,
and the stack is stopped. A group with no `start` block (the cluster examples of
docs/operations.md) runs against an embedded Redis of its own, as a cluster's Redis; its
`services` blocks start each long-running command (Celery workers) as its own process, wait
until each answers a ping by its node name, stop it with SIGTERM and require exit code 0.
`skip-run` blocks (Docker, the internet, a full `make`) are checked with `bash -n`;
json/yaml/http blocks are parsed.

How blocks run, and the only changes made to their text: tests/docruns.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from bench.photoserver import PhotoServer
from bgq.process import free_port
from bgq.redis_server import EmbeddedRedis
from tests import docblocks
from tests.docblocks import Block
from tests.docruns import (
    BIN,
    block_env,
    check_settings,
    example_buckets,
    example_files,
    run_block,
    run_services,
    started,
    substitute,
    substitutions,
)
from tests.helpers import ROOT

BLOCKS = docblocks.blocks()
GROUPS = sorted({b.group for b in BLOCKS if b.group})

# What each group's examples say they write, relative to its folder.
WRITES = {
    "cli": [
        "photo.out.png",
        "white.png",
        "cutouts",
        "left-half.png",
        "standing.png",
        "preview.jpg",
    ],
    "service": ["shoe.png", "white.png", "shoe.webp", "shoe-85.jpg", "a.png"],
}

# What each group's examples say a browser opens, once its stack runs: an HTML page.
OPENS = {"page": ["/"]}


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
    for fence in ("~~~sh", "````sh", "```sh {.x}"):
        with pytest.raises(ValueError, match=r"x\.md:2: a fence tests/docblocks\.py does not read"):
            docblocks._blocks_of("x.md", f"text\n{fence}\nls\n{fence[:4]}\n")


def test_crontab_lines_run_as_their_commands() -> None:
    """A crontab line (a text block: cron runs it, not a shell) runs a command that a run block
    runs, its variable assignments aside."""
    cron = re.compile(r"^(?:[\d*/,-]+\s+){5}(?P<command>.+)$")
    run = {
        without_assignments(line)
        for b in BLOCKS
        if b.lang == "sh" and b.fate == "run"
        for line in b.text.splitlines()
    }
    lines = [
        m["command"]
        for b in BLOCKS
        if b.lang == "text"
        for m in map(cron.match, b.text.splitlines())
        if m
    ]
    assert len(lines) >= 2
    assert [c for c in lines if without_assignments(c) not in run] == []


def without_assignments(line: str) -> str:
    """A command line without its leading `NAME=value` words and its comment."""
    line = re.sub(r"^(\s*[A-Z_]+=\S*\s+)*", "", line)
    return re.sub(r"\s+#.*$", "", line).strip()


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
        redis_url = None
        if not any(b.fate == "start" for b in members):  # a cluster's Redis
            redis_url = running.enter_context(EmbeddedRedis.start(folder / "redis")).url
            env.update(BGQ_REDIS_URL=redis_url, BGQ_CONCURRENCY="1")
        (folder / "urls.csv").write_text(f"id,url\nshoe,{server.url}/shoe.jpg\n")
        api = f"http://127.0.0.1:{free_port()}"
        swap = substitutions(api, server.url, redis=redis_url, home=env["BGQ_HOME"])
        for block in members:
            text = substitute(block.text, swap)
            if block.fate == "start":
                running.enter_context(started(block, text, folder, env))
            elif block.fate == "env":
                check_settings(block, text, folder, env)
            elif block.fate == "services":
                run_services(block, text, folder, env)
            else:
                run_block(block, text, folder, env)
        for path in OPENS.get(group, []):
            page = httpx.get(api + path, timeout=30)
            assert page.status_code == 200, f"GET {path}: {page.status_code}"
            assert page.headers["content-type"].startswith("text/html"), page.headers
            assert "<html" in page.text.lower(), page.text[:200]
    missing = [name for name in WRITES.get(group, []) if not (folder / name).exists()]
    assert not missing, f"the {group} examples did not write {missing}"
    if buckets is not None:
        written = buckets.client().list_objects_v2(Bucket="shop", Prefix="cutouts/")
        assert {o["Key"] for o in written.get("Contents", ())} == {
            "cutouts/car.png",
            "cutouts/shoes/anime.png",
        }


def test_substitution_changes_only_hosts_ports_and_paths() -> None:
    swap = substitutions(
        "http://127.0.0.1:4321", "http://127.0.0.1:999", "redis://127.0.0.1:77/0", "/tmp/h"
    )
    text = (
        "curl http://bgq:8000/v1/remove 'http://127.0.0.1:8000/x?image_url=https://cdn.example/s.jpg'"
        " && bgq api --port 8000 && .venv/bin/bgq submit https://shop.example/p/1.jpg"
        " https://shop.example/hooks/bgq\n"
        "export BGQ_REDIS_URL=redis://redis.internal:6379/0 BGQ_HOME=/mnt/shared/bgq X=/mnt/bgq"
    )
    assert substitute(text, swap) == (
        "curl http://127.0.0.1:4321/v1/remove "
        "'http://127.0.0.1:4321/x?image_url=http://127.0.0.1:999/s.jpg'"
        f" && bgq api --port 4321 && {BIN}/bgq submit http://127.0.0.1:999/p/1.jpg"
        " https://shop.example/hooks/bgq\n"
        "export BGQ_REDIS_URL=redis://127.0.0.1:77/0 BGQ_HOME=/tmp/h X=/tmp/h"
    )
