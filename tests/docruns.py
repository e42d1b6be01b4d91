"""How the docs' examples run (tests/test_docs.py): stacks, substitutions, services.

What a block runs with, and the only changes made to its text:

- hosts and ports: `http://127.0.0.1:8000` and `http://bgq:8000` become the group's API on a free
  loopback port, as does `--port 8000`; `redis://redis.internal:6379/0` the group's own Redis;
  image URLs (`https://cdn.example/NAME`,
  `https://shop.example/p/NAME`) become a loopback photo server serving the sample photos
  (`bench/photoserver.py`), so every stack runs with `BGQ_FETCH_ALLOW_PRIVATE=true`;
- paths: `.venv/bin/` becomes this venv's `bin/`, which also leads PATH (for plain `bgq`);
- files: the folder holds the files the examples name, made from `samples/`: photo.jpg,
  shoe.jpg, a.jpg, b.webp, a folder catalog/, products.csv and urls.csv; the buckets they name
  (`s3://photos`, `s3://shop`) are on the session's local S3 server (moto, bench/s3server.py),
  which BGQ_S3_ENDPOINT_URL points at;
- paths: `/mnt/bgq` and `/mnt/shared/bgq` (a cluster's shared BGQ_HOME) become the group's BGQ_HOME;
- environment: BGQ_HOME (one per group) and BGQ_MODELS_DIR (the provisioned weights), and for a
  group with its own Redis BGQ_REDIS_URL (as a cluster's hosts have it) and BGQ_CONCURRENCY=1
  (its workers run side by side on a small machine), nothing else of bgq's; `curl` is a
  wrapper that adds `--fail-with-body` unless the block says `-f`, so an HTTP error fails the
  block instead of printing a JSON error nobody reads.

Callback URLs are left as written: `shop.example` does not resolve, which the API accepts
(docs/service.md, webhooks). Output that other work may reword (CLI messages, the /docs page)
is not asserted: exit codes and the files the examples say they write are.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import httpx
from celery import Celery
from celery.utils.nodenames import host_format
from PIL import Image

import celeryconfig
from bench.s3server import S3Server
from bgq.settings import Settings, load_settings
from tests.docblocks import Block
from tests.helpers import BGQ, SAMPLES, processes_mentioning, wait_for

BIN = Path(sys.executable).parent
BLOCK_TIMEOUT = 120  # seconds, any one block

CURL = """#!/bin/sh
# the docs tests' curl: an HTTP error answer fails the block (unless it asks for -f itself)
for a; do case $a in --fail|-[a-zA-Z]*f*) exec {curl} "$@";; esac; done
exec {curl} --fail-with-body "$@"
"""


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


def substitutions(
    api: str, photos: str, redis: str | None = None, home: str | None = None
) -> list[tuple[str, str]]:
    port = api.rsplit(":", 1)[1]
    swap = [
        (r"http://(127\.0\.0\.1|bgq):8000", api),
        (r"--port 8000\b", f"--port {port}"),
        (r"https://cdn\.example/", f"{photos}/"),
        (r"https://shop\.example/p/", f"{photos}/p/"),
        (r"(?<![\w/])\.venv/bin/", f"{BIN}/"),
    ]
    if redis:
        swap.append((r"redis://redis\.internal:6379/0\b", redis))
    if home:
        swap.append((r"(?<![\w/])/mnt/(shared/)?bgq\b", home))
    return swap


def substitute(text: str, swap: list[tuple[str, str]]) -> str:
    for pattern, value in swap:
        text = re.sub(pattern, value, text)
    return text


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


def environment_after(block: Block, text: str, folder: Path, env: dict[str, str]) -> dict[str, str]:
    """The environment that shell text (assignments, `export`s) leaves, starting from `env`."""
    done = subprocess.run(
        ["bash", "-e", "-c", f"set -a\n{text}\nenv -0"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    assert done.returncode == 0, f"{block.where}: {done.stderr}"
    return dict(item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)


def settings_in(env: dict[str, str]) -> Settings:
    """bgq's settings as a process with exactly `env` loads them (a bad value: ConfigError)."""
    with mock.patch.dict(os.environ, env, clear=True):
        return load_settings()


def check_settings(block: Block, text: str, folder: Path, env: dict[str, str]) -> None:
    """Run a block of variable assignments over the group's environment: each BGQ_* variable it
    sets must be a setting, and bgq.settings.load_settings must load the result, so every
    BGQ_* value is parsed and the rules across settings hold (a key id of BGQ_API_LIMITS must
    be a key's of BGQ_API_KEYS). The values are not given to the group's stack, already
    running: its other examples send no key."""
    after = environment_after(block, text, folder, env)
    assigned = {k: v for k, v in after.items() if k.startswith("BGQ_") and env.get(k) != v}
    assert assigned, f"{block.where} sets no BGQ_* variable"
    unknown = [k for k in assigned if k.removeprefix("BGQ_").lower() not in Settings.model_fields]
    assert unknown == [], f"{block.where}: no such setting {unknown}"
    settings = settings_in(after)
    for name in assigned:
        assert getattr(settings, name.removeprefix("BGQ_").lower()) is not None, name


def run_services(block: Block, text: str, folder: Path, env: dict[str, str]) -> None:
    """Start each command of a services block as its own process (its `export` lines set their
    environment), wait until every one answers, stop each with SIGTERM (as a service manager
    does) and require exit code 0 and no process left. The commands are Celery workers: one
    answers when a ping reaches its node name (`-n`, else bgq's `bgq@%h` or Celery's)."""
    exports, commands = [], []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "export":
            exports.append(line)
        elif words:
            commands.append(words)
    assert commands, f"{block.where}: no command"
    service_env = environment_after(block, "\n".join(exports), folder, env)
    names = [node_name(block, words) for words in commands]
    procs: list[subprocess.Popen[bytes]] = []
    logs = [folder / f"services-{block.line}-{n}.log" for n in range(len(commands))]
    app = celery_app(settings_in(service_env))
    try:
        for words, log in zip(commands, logs, strict=True):
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        words,
                        cwd=folder,
                        env=service_env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

        def answering() -> bool:
            for proc, log in zip(procs, logs, strict=True):
                assert proc.poll() is None, f"{proc.args} exited: {log.read_text()}"
            replies = app.control.ping(destination=names, timeout=1) or []
            return {name for reply in replies for name in reply} >= set(names)

        wait_for(answering, timeout=120, what=f"{block.where}'s workers {names} to answer")
    finally:
        app.close()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
        home = service_env["BGQ_HOME"]
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not processes_mentioning(home), timeout=60, what="the workers to stop")
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    codes = {
        shlex.join(words): proc.returncode for words, proc in zip(commands, procs, strict=True)
    }
    assert set(codes.values()) == {0}, f"{block.where}: exit codes {codes} (logs: {logs})"
    assert processes_mentioning(home) == [], f"{block.where} left processes (logs: {logs})"


def node_name(block: Block, words: list[str]) -> str:
    program = Path(words[0]).name
    assert program in {"bgq", "celery"} and "worker" in words, (
        f"{block.where}: {shlex.join(words)}: a services block runs bgq or Celery workers"
    )
    for flag in ("-n", "--hostname"):
        if flag in words:
            return host_format(words[words.index(flag) + 1])
    return host_format(f"{program}@%h")


def celery_app(settings: Settings) -> Celery:
    """A Celery app on bgq's broker, to ping workers."""
    app = Celery("bgq-docs", set_as_current=False)
    app.conf.update(celeryconfig.build(settings))
    return app


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
