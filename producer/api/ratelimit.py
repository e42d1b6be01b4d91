"""Per-key limits of `bgq api` (BGQ_API_LIMITS): submissions per minute and jobs outstanding
at once, for each lane, counted in Redis so that they hold across any number of API processes.

Each count changes only inside a Lua script, so checking a limit and taking a unit of it is one
atomic step. Requests per minute are a sliding window: the times of the key's submissions in the
last minute (a sorted set). Jobs outstanding are the key's jobs of that lane still queued or
running: a sorted set of job ids, from which a job leaves once its enqueue guard is gone (it
ended; the guard is held from enqueue to the stored result). A job being submitted right now
has no guard yet: it is in a second set meanwhile, so no other process prunes it too early.
Each admission checks a bounded batch of the set for ended jobs, from a cursor that goes
round it, so every job is checked in turn however long the oldest ones run; at the limit, it
checks further (up to a whole lap of PRUNE_MOST jobs) before it refuses.

Keys appear only as their short id (bgq.quotas.key_id), in Redis keys, messages and metrics.
Over a limit: 429 `rate_limited`, with `Retry-After` and the `RateLimit-Policy` and `RateLimit`
fields of draft-ietf-httpapi-ratelimit-headers-10 (structured fields: `"bulk-rpm";q=60;w=60`,
`"bulk-rpm";r=0;t=12`). Jobs outstanding are a concurrency quota: `qu="concurrent-requests"`,
no window.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.commands.core import Script

from bgq import contract, defaults, quotas
from producer.api.errors import ApiError
from producer.api.metrics import Metrics
from producer.client import Producer

WINDOW = 60  # seconds: "per minute"
SUBMIT_TTL = 300  # seconds a submission may take before its job counts only by its guard
PRUNE_BATCH = 64  # a key's jobs checked for an ended guard, per admission, from its cursor
PRUNE_MOST = 1024  # the most checked by an admission at the limit, before it refuses
PREFIX = f"{defaults.KEY_PREFIX}limit:"

# KEYS: the key's request times in this lane; ARGV: limit, window, a new member. Take one unit
# unless the window is full. Returns allowed (0/1), the count, seconds until the oldest leaves.
RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local allowed = 0
if count < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('EXPIRE', KEYS[1], window + 1)
  count = count + 1
  allowed = 1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local reset = window
if oldest[2] then reset = tonumber(oldest[2]) + window - now end
return {allowed, count, tostring(reset)}
"""

# KEYS: the key's jobs outstanding in this lane, those being submitted, the prune cursor (a
# rank in the first); ARGV: limit, job id, guard key prefix, prune batch, the longest a job can
# be outstanding, SUBMIT_TTL, the most to prune-check at the limit. Drop ended jobs (no guard,
# not being submitted) from the cursor on, a batch, or at the limit until a lap or the most is
# checked; then count the job unless the limit is reached (a job counted already is let
# through: it is the same job). Returns allowed (0/1) and the count.
ADMIT = """
local now = tonumber(redis.call('TIME')[1])
local limit, batch, most = tonumber(ARGV[1]), tonumber(ARGV[4]), tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[6]))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[5]))
local count = redis.call('ZCARD', KEYS[1])
local lap = count
local at = tonumber(redis.call('GET', KEYS[3]) or '0')
local checked = 0
while checked < lap and (checked < batch or (count >= limit and checked < most)) do
  if at >= count then at = 0 end
  local jobs = redis.call('ZRANGE', KEYS[1], at, at + math.min(batch, lap - checked) - 1)
  local kept = 0
  for _, job in ipairs(jobs) do
    if redis.call('EXISTS', ARGV[3] .. job) == 0 and not redis.call('ZSCORE', KEYS[2], job) then
      redis.call('ZREM', KEYS[1], job)
      count = count - 1
    else
      kept = kept + 1
    end
  end
  checked = checked + #jobs
  at = at + kept
end
local known = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not known and count >= limit then
  redis.call('SET', KEYS[3], at, 'EX', ARGV[5])
  return {0, count}
end
if not known then
  redis.call('ZADD', KEYS[1], now, ARGV[2])
  count = count + 1
end
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('SET', KEYS[3], at, 'EX', ARGV[5])
return {1, count}
"""


@dataclass(frozen=True)
class Usage:
    """Where a key stands against one limit: a RateLimit-Policy item, a RateLimit item."""

    lane: str
    kind: str  # rpm | jobs
    quota: int
    remaining: int
    reset: int | None = None  # seconds until a unit is free again (rpm only)

    @property
    def name(self) -> str:
        return f"{self.lane}-{self.kind}"

    def policy(self) -> str:
        """This limit as a RateLimit-Policy item."""
        if self.kind == "rpm":
            return f'"{self.name}";q={self.quota};w={WINDOW}'
        return f'"{self.name}";q={self.quota};qu="concurrent-requests"'

    def service_limit(self) -> str:
        """What is left of it, as a RateLimit item."""
        left = f'"{self.name}";r={self.remaining}'
        return left if self.reset is None else f"{left};t={self.reset}"


def headers(usages: list[Usage]) -> dict[str, str]:
    """The RateLimit-Policy and RateLimit fields of these limits (none without limits)."""
    if not usages:
        return {}
    return {
        "RateLimit-Policy": ", ".join(u.policy() for u in usages),
        "RateLimit": ", ".join(u.service_limit() for u in usages),
    }


def run_of(caller: str | None) -> str:
    """The bulk run of an API caller: one per key (`key-<id>`), so keys share bulk fairly."""
    return f"key-{caller}" if caller else "api"


class Limiter:
    """BGQ_API_LIMITS enforced in Redis, through the producer's client and outage handling."""

    def __init__(self, table: quotas.Table, producer: Producer, metrics: Metrics) -> None:
        self.table = table
        self.producer = producer
        self.metrics = metrics
        self._scripts: dict[str, Script] = {}

    def limits(self, caller: str | None, lane: str) -> dict[str, int]:
        """The caller's limits in `lane`, by kind (none without keys or limits)."""
        if caller is None or not self.table:
            return {}
        rules = quotas.limits_for(self.table, caller)
        return {kind: limit for (on, kind), limit in rules.items() if on == lane}

    def count_request(self, caller: str | None, lane: str) -> list[Usage]:
        """Count a submission in the caller's minute; 429 when the minute is full."""
        limit = self.limits(caller, lane).get("rpm")
        if caller is None or limit is None:
            return []
        keys = [f"{PREFIX}{caller}:{lane}:rpm"]
        args = [limit, WINDOW, uuid.uuid4().hex]
        allowed, count, reset = self._run("RATE", keys, args)
        wait = max(1, math.ceil(float(reset)))
        usage = Usage(lane, "rpm", limit, max(0, limit - int(count)), wait)
        if not allowed:
            message = f"over this key's limit of {limit} {lane} requests per minute"
            raise self.refuse(caller, usage, [usage], message, wait)
        return [usage]

    def hold_job(
        self, caller: str, lane: str, key: str, cached: Callable[[], bool], usages: list[Usage]
    ) -> Usage | None:
        """Count the job `key` as the caller's until it ends; 429 when the caller has its limit
        of jobs outstanding in `lane` (unless the result is in the store: that costs nothing)."""
        limit = self.limits(caller, lane)["jobs"]
        base = f"{PREFIX}{caller}:{lane}"
        keys = [f"{base}:jobs", f"{base}:submitting", f"{base}:cursor"]
        guard = contract.guard_key("")
        args = [limit, key, guard, PRUNE_BATCH, defaults.GUARD_TTL, SUBMIT_TTL, PRUNE_MOST]
        allowed, count = self._run("ADMIT", keys, args)
        usage = Usage(lane, "jobs", limit, max(0, limit - int(count)))
        if allowed:
            return usage
        if cached():
            return None
        message = f"this key has {count} {lane} jobs outstanding, its limit of {limit}"
        raise self.refuse(caller, usage, [*usages, usage], message, defaults.API_LIMIT_RETRY_AFTER)

    def release_job(self, caller: str, lane: str, key: str, outstanding: bool) -> None:
        """The job's submission is over: it counts by its guard now, or not at all if it is
        not outstanding (a cache hit, a failed submission)."""
        base = f"{PREFIX}{caller}:{lane}"

        def release() -> None:
            with self.producer.app.backend.client.pipeline(transaction=False) as pipe:
                pipe.zrem(f"{base}:submitting", key)
                if not outstanding:
                    pipe.zrem(f"{base}:jobs", key)
                pipe.execute()

        self.producer.with_broker("release a job's limit", release)

    def refuse(
        self, caller: str, usage: Usage, usages: list[Usage], message: str, wait: int
    ) -> ApiError:
        """The 429 for being over `usage`'s limit (the key by its id only)."""
        self.metrics.limited.labels(caller, usage.lane, usage.kind).inc()
        return ApiError(
            429,
            "rate_limited",
            f"{message}; retry after {wait} s",
            {"Retry-After": str(wait), **headers(usages)},
        )

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run one of the scripts (by its SHA, loaded once), riding out a short outage."""
        client = self.producer.app.backend.client
        if name not in self._scripts:
            self._scripts[name] = client.register_script({"RATE": RATE, "ADMIT": ADMIT}[name])
        script = self._scripts[name]
        return self.producer.with_broker("check a limit", lambda: script(keys, args, client))
