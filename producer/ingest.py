"""`bgq ingest`: stream a catalog through the queue with a bounded window, report every input.

Cache hits are answered from the store; misses are enqueued, at most `window` at a time.
Without a broker (no BGQ_REDIS_URL, no `bgq up`) the first miss starts an embedded stack for
the run. A second run over the same catalog finds its results in the store, so an interrupted
run resumes where it stopped and a finished one is all cache hits.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from bgq import defaults
from bgq.contract import Options
from bgq.errors import BgqError, JobFailed, NoBroker
from bgq.settings import Settings
from bgq.store import atomic_write
from producer.catalog import Item, open_catalog
from producer.client import Job, Producer

if TYPE_CHECKING:
    from rich.progress import Progress

    from bgq.stack import LocalStack

POLL_MIN = 0.02  # seconds between store checks of outstanding jobs while results arrive
POLL_MAX = 0.2  # seconds between checks once nothing has arrived for a while
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


def place(result: Path, dest: Path) -> None:
    """Put a result at `dest` atomically: a hard link into the store, or a copy across devices."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if dest.exists() and os.path.samefile(result, dest):
            return
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        os.link(result, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        atomic_write(dest, result.read_bytes())


class Ingest:
    """One ingestion run: submit, wait within the window, place outputs, report."""

    def __init__(
        self,
        settings: Settings,
        out_dir: Path,
        model: str,
        options: Options,
        window: int = defaults.INGEST_WINDOW,
        report: IO[str] | None = None,
        on_outcome: Callable[[Counter[str]], None] | None = None,
        stack_log: Path | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.warn = warn or (lambda message: print(message, file=sys.stderr))
        self.producer = Producer(settings)
        self.out_dir = out_dir
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
        """Process every item; stops an embedded stack it started, whatever happens."""
        try:
            for item in items:
                self._start(item)
                while len(self.pending) >= self.window:
                    self._collect()
            while self.pending:
                self._collect()
        finally:
            self.producer.flush_stats()
            if self.stack is not None:
                self.stack.stop()
                self.stack = None

    def _start(self, item: Item) -> None:
        started = time.monotonic()
        if item.error is not None or item.output is None:
            self._record(item, None, "failed", item.error or "no output name", started)
            return
        source = Path(item.source)
        if source.exists() and not source.is_file():
            self._record(item, None, "failed", "not a regular file", started)
            return
        try:
            data = source.read_bytes()
        except OSError as exc:
            self._record(item, None, "failed", f"cannot read: {exc.strerror or exc}", started)
            return
        job = self._submit(data)
        if job.error is not None:
            self._record(item, job.key, "failed", str(job.error), started)
        elif job.cached:
            self._finish(item, job, job.output_path, "cached", started)
        else:
            self.pending.append(Pending(item, job, started, started))

    def _submit(self, data: bytes) -> Job:
        """Submit through the producer; with no broker at all, start an embedded stack first."""
        try:
            return self.producer.submit_data(data, self.model, self.options, raise_bad_image=False)
        except NoBroker:
            from bgq.stack import LocalStack

            self.stack = LocalStack(self.settings, log=self.stack_log).start()
            self.producer.flush_stats()  # the hits so far: it finds the embedded Redis now
            settings = self.settings.model_copy(update={"redis_url": self.stack.url})
            self.producer = Producer(settings)
            return self.producer.submit_data(data, self.model, self.options, raise_bad_image=False)

    def _collect(self) -> None:
        """Wait until at least one outstanding job has finished (or failed), and record it."""
        delay = POLL_MIN
        while True:
            finished = 0
            now = time.monotonic()
            for entry in list(self.pending):
                check_state = now - entry.checked >= defaults.INGEST_STATE_POLL
                if check_state:
                    entry.checked = now
                try:
                    path = entry.job.poll(check_state=check_state)
                except JobFailed as exc:
                    self._record(entry.item, entry.job.key, "failed", exc.error, entry.started)
                    self.pending.remove(entry)
                    finished += 1
                    continue
                if path is not None:
                    self._finish(entry.item, entry.job, path, "done", entry.started)
                    self.pending.remove(entry)
                    finished += 1
            if finished:
                return
            self._check_stack()
            self._check_stalled()
            time.sleep(delay)
            delay = min(POLL_MAX, delay * 1.5)

    def _check_stack(self) -> None:
        worker = self.stack.worker if self.stack else None
        if worker is not None and worker.poll() is not None:
            raise BgqError(
                f"the embedded worker exited with code {worker.returncode}; see {self.stack_log}"
            )

    def _check_stalled(self) -> None:
        """After INGEST_STALL_WARNING seconds without a finished input, say so if no worker is
        online on the cluster's broker (then keep waiting: one may be started)."""
        now = time.monotonic()
        if self.stack is not None or now - self.progress_at < defaults.INGEST_STALL_WARNING:
            return
        self.progress_at = now  # look again after another period
        try:
            online = self.producer.workers_online()
        except BgqError:
            return  # the broker itself is failing: the next submit or poll reports it
        if not online:
            self.warn(
                f"bgq: nothing has finished for {defaults.INGEST_STALL_WARNING:.0f}s and no worker "
                f"is online; start one with `bgq worker` (same BGQ_REDIS_URL and store). "
                f"{len(self.pending)} jobs are waiting; Ctrl-C stops, the same command resumes."
            )

    def _finish(self, item: Item, job: Job, result: Path, status: str, started: float) -> None:
        assert item.output is not None
        dest = self.out_dir / item.output
        try:
            place(result, dest)
        except OSError as exc:
            self._record(item, job.key, "failed", f"cannot write {dest}: {exc}", started)
            return
        self._record(item, job.key, status, None, started, str(dest))

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


def run_ingest(
    settings: Settings,
    src: Path,
    out: Path,
    model: str,
    options: Options,
    window: int,
    report_path: Path | None,
) -> int:
    """The whole `bgq ingest` command: progress, report, summary; returns the failed count."""
    out = out.absolute()
    total, items = open_catalog(src, exclude=out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = report_path or out / REPORT_NAME
    progress, update = _progress(total)
    started = time.monotonic()
    with report_path.open("w", encoding="utf-8") as report, progress:
        run = Ingest(
            settings,
            out,
            model,
            options,
            window,
            report,
            update,
            settings.run_dir / STACK_LOG,
            lambda message: progress.console.print(
                message, markup=False, highlight=False, soft_wrap=True
            ),
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
