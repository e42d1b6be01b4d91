"""`bgq ingest`: stream a catalog through the queue with a bounded window, report every input.

Cache hits are answered from the store; misses are enqueued, at most `window` at a time.
Without a broker (no BGQ_REDIS_URL, no `bgq up`) the first miss starts an embedded stack for
the run. The first miss also checks that a live worker serves the model (once a stack started
here is ready), and only the first: a run is refused at once, not stopped half-way when the
workers go away (its jobs wait for the next one). A second run over the same catalog finds its
results in the store, so an interrupted run resumes where it stopped and a finished one is all
cache hits.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from bgq import contract, defaults
from bgq.contract import BULK
from bgq.errors import BgqError, JobFailed, NoBroker, StoreError
from bgq.options import FORMATS, Options
from bgq.settings import Settings
from bgq.stack import LocalStack
from bgq.store import Store
from bgq.urls import is_s3
from producer.catalog import Item, open_catalog, read_file
from producer.client import Producer, host_label
from producer.job import Job
from producer.reader import Reader
from producer.remote import S3Prefix

if TYPE_CHECKING:
    from rich.progress import Progress

REPORT_NAME = "bgq-report.jsonl"  # default report file, in the output folder
STACK_LOG = "ingest-worker.log"  # log of an embedded stack's worker, in BGQ_HOME/run
MAX_LISTED_FAILURES = 50  # failed inputs listed in the closing summary (all are in the report)


@dataclass
class Outcome:
    """One line of the JSONL report."""

    source: str
    id: str | None
    key: str | None
    status: str  # done | cached | failed
    output: str | None
    error: str | None
    seconds: float


@dataclass
class Pending:
    """A job submitted and not finished yet."""

    item: Item
    job: Job
    started: float
    checked: float


class Destination(Protocol):
    """Where ingest puts outputs: a local folder or an S3 prefix."""

    def place(self, store: Store, output: str, name: str) -> str:
        """Put the stored result `output` under the relative `name`; return where it went."""
        ...


@dataclass(frozen=True)
class Folder:
    """Outputs in a local folder: hard links into a filesystem store when possible, else copies
    (downloads from S3), each placed atomically."""

    root: Path

    def place(self, store: Store, output: str, name: str) -> str:
        dest = self.root / name
        store.save(output, dest, link=True)
        return str(dest)


def stack_models(settings: Settings, model: str) -> list[str]:
    """The models the worker of an ingest's embedded stack serves: BGQ_MODELS and its own."""
    served = settings.served_models
    return served if model in served else [*served, model]


class Ingest:
    """One ingestion run: submit, wait within the window, place outputs, report."""

    def __init__(
        self,
        settings: Settings,
        out: Destination,
        model: str,
        options: Options,
        window: int = defaults.INGEST_WINDOW,
        report: IO[str] | None = None,
        on_outcome: Callable[[Counter[str]], None] | None = None,
        stack_log: Path | None = None,
        warn: Callable[[str], None] | None = None,
        read: Callable[[str], bytes] = read_file,
        fetch_concurrency: int = defaults.FETCH_CONCURRENCY,
        lane: str = BULK,
        run_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.warn = warn or (lambda message: print(message, file=sys.stderr))
        self.lane = lane
        self.producer = Producer(settings, run=run_id, served_memo=math.inf)
        self.out = out
        self.read = read
        self.fetch_concurrency = fetch_concurrency
        self.model = model
        self.options = options
        self.window = window
        self.report = report
        self.on_outcome = on_outcome
        self.stack_log = stack_log
        self.stack: LocalStack | None = None
        self.pending: list[Pending] = []
        self.counts: Counter[str] = Counter()
        self.failures: list[Outcome] = []
        self.progress_at = time.monotonic()  # when an input last finished (stall detection)

    def run(self, items: Iterable[Item]) -> None:
        """Process every item; stops an embedded stack it started, whatever happens.

        Inputs are read ahead on `fetch_concurrency` threads and submitted in order; the jobs
        outstanding plus the inputs read ahead never exceed the window.
        """
        inputs = iter(items)
        reader = Reader(self.settings, self.read, self.fetch_concurrency)
        try:
            while True:
                while len(reader) + len(self.pending) < self.window:
                    item = next(inputs, None)
                    if item is None:
                        break
                    reader.add(item)
                if len(reader):
                    self._start(*reader.next())
                elif self.pending:
                    self._collect()
                else:
                    break
                while len(self.pending) >= self.window:
                    self._collect()
        finally:
            reader.close()
            self.producer.flush_stats()
            if self.stack is not None:
                self.stack.stop()
                self.stack = None

    def _start(self, item: Item, data: bytes | None, error: str | None) -> None:
        started = time.monotonic()
        if item.error is not None or item.output is None:
            self._record(item, None, "failed", item.error or "no output name", started)
            return
        if data is None:
            self._record(item, None, "failed", error or "cannot read", started)
            return
        job = self._submit(data)
        if job.error is not None:
            self._record(item, job.key, "failed", str(job.error), started)
        elif job.cached:
            self._finish(item, job, "cached", started)
        else:
            self.pending.append(Pending(item, job, started, started))

    def _submit(self, data: bytes) -> Job:
        """Submit through the producer; with no broker at all, start an embedded stack first."""
        try:
            return self._submit_to(self.producer, data)
        except NoBroker:
            self.stack = LocalStack(self.stack_settings(), log=self.stack_log).start()
            self.producer.close()  # flushes the hits so far: it finds the embedded Redis now
            settings = self.settings.model_copy(update={"redis_url": self.stack.url})
            self.producer = Producer(settings, run=self.producer.run, served_memo=math.inf)
            return self._submit_to(self.producer, data)

    def stack_settings(self) -> Settings:
        """An embedded stack's settings: its worker serves BGQ_MODELS and this ingest's model."""
        models = stack_models(self.settings, self.model)
        return self.settings.model_copy(update={"models": ",".join(models)})

    def _submit_to(self, producer: Producer, data: bytes) -> Job:
        return producer.submit_data(data, self.model, self.options, False, lane=self.lane)

    def _collect(self) -> None:
        """Wait until at least one outstanding job has finished (or failed), and record it.

        Each round reads every outstanding job's state in one Redis round trip; the store is
        asked only for those that report success (or lost their guard, once a second).
        """
        delay = defaults.INGEST_POLL_FIRST
        while True:
            now = time.monotonic()
            metas = self.producer.task_metas([entry.job.key for entry in self.pending])
            finished = 0
            for entry, meta in zip(list(self.pending), metas, strict=True):
                check_lost = now - entry.checked >= defaults.INGEST_LOST_CHECK
                if check_lost:
                    entry.checked = now
                try:
                    done = entry.job.update(meta, check_lost) is not None
                except JobFailed as exc:
                    self._record(entry.item, entry.job.key, "failed", exc.error, entry.started)
                    done = True
                else:
                    if done:
                        self._finish(entry.item, entry.job, "done", entry.started)
                if done:
                    self.pending.remove(entry)
                    finished += 1
            if finished:
                return
            self._check_stack()
            self._check_stalled()
            time.sleep(delay)
            delay = min(defaults.INGEST_POLL_MAX, delay * 1.5)

    def _check_stack(self) -> None:
        worker = self.stack.worker if self.stack else None
        if worker is not None and worker.poll() is not None:
            raise BgqError(
                f"the embedded worker exited with code {worker.returncode}; see {self.stack_log}"
            )

    def _check_stalled(self) -> None:
        """After INGEST_STALL_WARNING seconds without a finished input, say so if no live worker
        serves this run's model in its lane, or none is online on the cluster's broker (then
        keep waiting: one may be started)."""
        now = time.monotonic()
        if self.stack is not None or now - self.progress_at < defaults.INGEST_STALL_WARNING:
            return
        self.progress_at = now  # look again after another period
        try:
            served = self.producer.served.serves(self.model, self.lane)
            online = served and self.producer.workers_online()
        except BgqError:
            return  # the broker itself is failing: the next submit or poll reports it
        if not served:
            missing = (
                f"no live worker serves {self.model} in the {self.lane} lane; start one with "
                f"`bgq worker --models {self.model} --lanes {self.lane}`"
            )
        elif not online:
            missing = "no worker is online; start one with `bgq worker`"
        else:
            return
        self.warn(
            f"bgq: nothing has finished for {defaults.INGEST_STALL_WARNING:.0f}s and {missing} "
            f"(same BGQ_REDIS_URL and store). {len(self.pending)} jobs are waiting; Ctrl-C "
            f"stops, the same command resumes."
        )

    def _finish(self, item: Item, job: Job, status: str, started: float) -> None:
        assert item.output is not None
        try:
            dest = self.out.place(self.producer.store, job.output, item.output)
        except (OSError, StoreError) as exc:
            self._record(item, job.key, "failed", f"cannot place {item.output}: {exc}", started)
            return
        self._record(item, job.key, status, None, started, dest)

    def _record(
        self,
        item: Item,
        key: str | None,
        status: str,
        error: str | None,
        started: float,
        output: str | None = None,
    ) -> None:
        self.progress_at = time.monotonic()
        seconds = round(self.progress_at - started, 4)
        outcome = Outcome(item.source, item.id, key, status, output, error, seconds)
        self.counts[status] += 1
        if status == "failed" and len(self.failures) < MAX_LISTED_FAILURES:
            self.failures.append(outcome)  # the first few, for the summary; all are in the report
        if self.report is not None:
            self.report.write(json.dumps(asdict(outcome)) + "\n")
            self.report.flush()
        if self.on_outcome is not None:
            self.on_outcome(self.counts)


def _progress(total: int) -> tuple[Progress, Callable[[Counter[str]], None]]:
    """A live bar on stderr (terminals only) with done / cached / failed counts and the rate."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("done {task.fields[done]}  cached {task.fields[cached]}"),
        TextColumn("[red]failed {task.fields[failed]}"),
        TextColumn("{task.fields[rate]:.1f} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    task = progress.add_task("ingest", total=total, done=0, cached=0, failed=0, rate=0.0)
    started = time.monotonic()

    def update(counts: Counter[str]) -> None:
        finished = sum(counts.values())
        progress.update(
            task,
            completed=finished,
            rate=finished / max(time.monotonic() - started, 1e-9),
            done=counts["done"],
            cached=counts["cached"],
            failed=counts["failed"],
        )

    return progress, update


def default_run_id(src: str) -> str:
    """An ingest's bulk run when --run-id is not given: this host and SRC, so that the same
    command run again (a resume) keeps its run, and other catalogs get their own."""
    where = src if is_s3(src) else str(Path(src).resolve())
    return f"{host_label()}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


def open_source(
    settings: Settings, src: str, exclude: Path | str, ext: str = ".png"
) -> tuple[int, Iterator[Item], Callable[[str], bytes]]:
    """The inputs of SRC (a folder, a manifest or an S3 prefix) and how to read each; outputs
    are named with `ext`."""
    if is_s3(src):
        bucket = S3Prefix(settings, src)
        total, items = bucket.catalog(exclude if isinstance(exclude, str) else None, ext)
        return total, items, bucket.read
    folder = exclude if isinstance(exclude, Path) else None
    total, items = open_catalog(Path(src), exclude=folder, ext=ext)
    return total, items, read_file


def run_ingest(
    settings: Settings,
    src: str,
    out: str,
    model: str,
    options: Options,
    window: int,
    report_path: Path | None,
    fetch_concurrency: int = defaults.FETCH_CONCURRENCY,
    lane: str = BULK,
    run_id: str | None = None,
) -> int:
    """The whole `bgq ingest` command: progress, report, summary; returns the failed count."""
    run_id = contract.check_run(run_id) if run_id is not None else default_run_id(src)
    dest: Folder | S3Prefix
    ext = FORMATS[options.format]
    if is_s3(out):
        dest = S3Prefix(settings, out)
        total, items, read = open_source(settings, src, dest.url, ext)
        report_path = report_path or Path(REPORT_NAME)
    else:
        dest = Folder(Path(out).absolute())
        total, items, read = open_source(settings, src, dest.root, ext)
        dest.root.mkdir(parents=True, exist_ok=True)
        report_path = report_path or dest.root / REPORT_NAME
    report_path.parent.mkdir(parents=True, exist_ok=True)
    progress, update = _progress(total)
    started = time.monotonic()
    with report_path.open("w", encoding="utf-8") as report, progress:
        run = Ingest(
            settings,
            dest,
            model,
            options,
            window,
            report,
            update,
            settings.run_dir / STACK_LOG,
            lambda message: progress.console.print(
                message, markup=False, highlight=False, soft_wrap=True
            ),
            read,
            fetch_concurrency,
            lane,
            run_id,
        )
        try:
            run.run(items)
        except KeyboardInterrupt:
            progress.stop()
            print(
                "bgq: interrupted; run the same command again to finish the rest", file=sys.stderr
            )
            raise SystemExit(130) from None
    _summary(run, time.monotonic() - started, report_path)
    return run.counts["failed"]


def _summary(run: Ingest, elapsed: float, report_path: Path) -> None:
    counts = run.counts
    total = sum(counts.values())
    print(
        f"{total} inputs in {elapsed:.1f}s ({total / max(elapsed, 1e-9):.1f} img/s): "
        f"{counts['done']} done, {counts['cached']} cached, {counts['failed']} failed"
    )
    for outcome in run.failures:
        print(f"FAILED {outcome.source}: {outcome.error}")
    if counts["failed"] > len(run.failures):
        print(f"... and {counts['failed'] - len(run.failures)} more failures")
    print(f"report: {report_path}")
