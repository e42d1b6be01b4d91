"""The store's lifecycle: what it holds, and pruning it by age and size, least recently used first.

A result's modification time is its last use: workers write it, and producers re-stamp it on a
cache hit (`Store.use_output`), on a directory and on S3 alike. Masks (one model's masks of an
input, from which every output variant is derived) are stamped the same way when a worker
derives from them, and pruned with the results, least recently used first. Prune never deletes
a result or mask used within PRUNE_MIN_IDLE seconds, a result whose job is in flight (its guard
is held in Redis), or a mask of an input that a job in flight needs (its reference set in Redis),
and removes an input blob once no job needs it any more unless inputs are kept.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from bgq import contract, defaults
from bgq.connections import redis_client
from bgq.contract import INPUTS, MASKS, RESULTS
from bgq.errors import BrokerError, NoBroker
from bgq.store import Entry, Store

if TYPE_CHECKING:
    from bgq.settings import Settings

LOCK_KEY = f"{defaults.KEY_PREFIX}prune-lock"


@dataclass
class StoreStats:
    results: int = 0
    result_bytes: int = 0
    inputs: int = 0
    input_bytes: int = 0
    masks: int = 0
    mask_bytes: int = 0


def store_stats(store: Store) -> StoreStats:
    """Count the store's results, masks and inputs, and their bytes (a full listing)."""
    stats = StoreStats()
    for entry in store.scan(RESULTS):
        stats.results += 1
        stats.result_bytes += entry.size
    for entry in store.scan(MASKS):
        stats.masks += 1
        stats.mask_bytes += entry.size
    for entry in store.scan(INPUTS):
        stats.inputs += 1
        stats.input_bytes += entry.size
    return stats


@dataclass
class PruneReport:
    """What a prune did; results and masks are counted together (masks_*: of which masks)."""

    masks_removed: int = 0
    masks_kept: int = 0
    removed: int = 0
    removed_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    skipped_recent: int = 0  # used within PRUNE_MIN_IDLE
    skipped_in_flight: int = 0  # a job on that key is queued or running
    inputs_removed: int = 0
    inputs_removed_bytes: int = 0
    inputs_kept: int = 0
    temporaries_removed: int = 0
    notes: list[str] = field(default_factory=list)


def _exists(client: redis.Redis | None, keys: list[str]) -> list[bool]:
    if client is None or not keys:
        return [False] * len(keys)
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(key)
        return [bool(n) for n in pipe.execute()]


def _in_flight_key(entry: Entry) -> str:
    """The Redis key that exists while a job needs the entry: its guard, or its input's refs."""
    if entry.kind == MASKS:
        return contract.input_refs_key(contract.name_digest(entry.name))
    return contract.guard_key(contract.name_digest(entry.name))


def prune(
    store: Store,
    client: redis.Redis | None,
    max_age: float | None = None,
    max_size: int | None = None,
    keep_inputs: bool = False,
    dry_run: bool = False,
    now: float | None = None,
) -> PruneReport:
    """Delete results and masks unused for `max_age` seconds, then the least recently used
    ones until they fit in `max_size` bytes; then unneeded inputs.

    `client` is the cluster's Redis (None when there is none: nothing can be in flight, but
    queued jobs of a stopped embedded Redis may need their inputs, so inputs are kept).
    """
    now = time.time() if now is None else now
    report = PruneReport()
    entries = sorted([*store.scan(RESULTS), *store.scan(MASKS)], key=lambda e: e.mtime)
    remaining = sum(e.size for e in entries)
    done = False
    for start in range(0, len(entries), defaults.PRUNE_LOOKUP_BATCH):
        chunk = entries[start : start + defaults.PRUNE_LOOKUP_BATCH]
        busy = [False] * len(chunk) if done else _exists(client, [_in_flight_key(e) for e in chunk])
        for entry, in_flight in zip(chunk, busy, strict=True):
            expired = max_age is not None and now - entry.mtime > max_age
            oversize = max_size is not None and remaining > max_size
            if done or not (expired or oversize):
                done = True  # sorted by last use: every later entry is newer, and it all fits
                report.kept += 1
                report.masks_kept += entry.kind == MASKS
                report.kept_bytes += entry.size
                continue
            if now - entry.mtime < defaults.PRUNE_MIN_IDLE:
                report.skipped_recent += 1
            elif in_flight:
                report.skipped_in_flight += 1
            elif dry_run or store.delete_if_unused(entry, now):
                report.removed += 1
                report.masks_removed += entry.kind == MASKS
                report.removed_bytes += entry.size
                remaining -= entry.size
                continue
            report.kept += 1
            report.masks_kept += entry.kind == MASKS
            report.kept_bytes += entry.size
    if max_size is not None and remaining > max_size:
        report.notes.append(
            f"the results and masks still take {remaining} bytes, over {max_size}: the rest "
            f"were used within the last {defaults.PRUNE_MIN_IDLE:g} s or belong to jobs in flight"
        )
    _prune_inputs(store, client, keep_inputs, dry_run, now, report)
    report.temporaries_removed = store.remove_temporaries(defaults.PRUNE_TMP_AGE, now, dry_run)
    return report


def _prune_inputs(
    store: Store,
    client: redis.Redis | None,
    keep_inputs: bool,
    dry_run: bool,
    now: float,
    report: PruneReport,
) -> None:
    """Remove input blobs that no job needs: old enough and with no reference left in Redis."""
    if keep_inputs:
        return
    if client is None:
        report.notes.append("no Redis to ask which inputs queued jobs still need: inputs kept")
        return
    old = [e for e in store.scan(INPUTS) if now - e.mtime > defaults.PRUNE_INPUT_GRACE]
    for start in range(0, len(old), defaults.PRUNE_LOOKUP_BATCH):
        chunk = old[start : start + defaults.PRUNE_LOOKUP_BATCH]
        needed = _exists(client, [contract.input_refs_key(e.name) for e in chunk])
        for entry, in_use in zip(chunk, needed, strict=True):
            if in_use:
                report.inputs_kept += 1
                continue
            if not dry_run and not store.delete_if_unused(entry, now):
                report.inputs_kept += 1
                continue
            report.inputs_removed += 1
            report.inputs_removed_bytes += entry.size


@contextlib.contextmanager
def prune_lock(client: redis.Redis | None) -> Iterator[bool]:
    """Hold the cluster-wide prune lock; yields False when another prune holds it."""
    if client is None:
        yield True
        return
    token = f"{os.getpid()}-{time.time()}"
    if not client.set(LOCK_KEY, token, nx=True, ex=int(defaults.PRUNE_INTERVAL)):
        yield False
        return
    try:
        yield True
    finally:
        if client.get(LOCK_KEY) == token.encode():
            client.delete(LOCK_KEY)


def cluster_redis(settings: Settings) -> redis.Redis | None:
    """The cluster's Redis, or None when there is none (no BGQ_REDIS_URL, no `bgq up`).

    A configured Redis that does not answer raises BrokerError: pruning without knowing which
    jobs are in flight could delete what they need.
    """
    try:
        client = redis_client(settings)
    except NoBroker:
        return None
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise BrokerError(f"cannot reach Redis: {exc}") from exc
    return client
