"""The contract between producer and workers: cache key, store layout, task name and arguments.

Kept free of heavy imports (no rembg, no onnxruntime, no Celery) so that producers stay light.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from bgq import defaults
from bgq.errors import InvalidRequest
from bgq.options import CONTENT_TYPES, FORMATS, REMBG_FIELDS, Options  # options enter the cache key

# Bump whenever output pixels could change for the same input, model and options (the rembg
# pin in pyproject.toml, or bgq's own pipeline code): old cache entries then stop matching.
PIPELINE_VERSION = "1"

TASK_NAME = "bgq.remove_background"
INTERACTIVE = "interactive"  # lanes: a job waits in one, workers empty the interactive one first
BULK = "bulk"
LANES = (INTERACTIVE, BULK)
QUEUE = defaults.QUEUE  # the interactive lane's queue
BULK_QUEUE = f"{defaults.QUEUE}.bulk"  # bulk jobs let in to run, about one cluster deep
RUN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}")  # a bulk run's name
WEBHOOK_TASK_NAME = "bgq.deliver_webhook"  # kwargs: url, body (the job JSON, as sent)
WEBHOOK_QUEUE = f"{defaults.QUEUE}.webhooks"  # kept apart so deliveries skip the image backlog
PRUNE_TASK_NAME = "bgq.prune_cache"  # no arguments: the worker's BGQ_CACHE_* settings apply
MAINTENANCE_QUEUE = f"{defaults.QUEUE}.maintenance"
# Jobs are routed by model: each model has its own queue per lane, so a worker consumes only the
# jobs of the models it serves (BGQ_MODELS). BASE_MODEL's queues keep the names they had before
# routing (bgq, bgq.bulk), so a rolling upgrade strands no message; another model's queues are
# `bgq@<model>` and `bgq.bulk@<model>` ('@' is not in a model name, and `bgq.bulk.<run>` are
# run lists).
BASE_MODEL = "u2netp"
MODEL_HEADER = "bgq_model"  # message header: the job's model (DISPATCH routes bulk jobs by it)


def image_queue(lane: str, model: str) -> str:
    """The queue where jobs of `model` in `lane` wait for a worker that serves that model."""
    base = QUEUE if lane == INTERACTIVE else BULK_QUEUE
    return base if model == BASE_MODEL else f"{base}@{model}"


def consume_order(models: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The queues of a worker serving `models`, strictly in the order it tries them: every
    model's interactive queue (in `models`' order), webhooks, maintenance, every bulk queue."""
    return (
        *(image_queue(INTERACTIVE, model) for model in models),
        WEBHOOK_QUEUE,
        MAINTENANCE_QUEUE,
        *(image_queue(BULK, model) for model in models),
    )


CONSUME_ORDER = consume_order([BASE_MODEL])  # a worker of BASE_MODEL alone: strict, first wins
IMAGE_QUEUES = (QUEUE, BULK_QUEUE)  # a worker consuming either needs a model (BASE_MODEL's)


def queue_route(queue: str) -> tuple[str, str] | None:
    """The (lane, model) of an image queue; None for any other queue."""
    base, _, model = queue.partition("@")
    lane = {QUEUE: INTERACTIVE, BULK_QUEUE: BULK}.get(base)
    if lane is None or (not model and "@" in queue):
        return None
    return lane, model or BASE_MODEL


def check_model(name: str) -> str:
    """Return `name` if bgq can run that rembg model, else raise InvalidRequest."""
    if choices := defaults.unknown_model_hint(name):
        raise InvalidRequest(f"unknown model {name!r}; {choices}")
    return name


def check_lane(lane: str) -> str:
    """Return `lane` if it is one of LANES, else raise InvalidRequest."""
    if lane not in LANES:
        raise InvalidRequest(f"lane: must be one of {', '.join(LANES)}, not {lane!r}")
    return lane


def check_run(run: str) -> str:
    """Return `run` if it can name a bulk run (RUN_RE), else raise InvalidRequest."""
    if not RUN_RE.fullmatch(run):
        raise InvalidRequest(
            f"run id {run!r}: 1 to 64 letters, digits and `_.:@-`, starting with a letter or digit"
        )
    return run


def run_queue(run: str) -> str:
    """The Redis list where a bulk run's jobs wait until the scheduler lets them in."""
    return f"{BULK_QUEUE}.{run}"


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def input_digest(data: bytes) -> str:
    """SHA-256 (hex) of an input image's bytes."""
    return hashlib.sha256(data).hexdigest()


def cache_key(input_sha256: str, model: str, options: Options) -> str:
    """SHA-256 over (input digest, model, canonical options, pipeline version); also the job id."""
    payload = canonical_json([input_sha256, model, options.canonical(), PIPELINE_VERSION])
    return hashlib.sha256(payload.encode()).hexdigest()


INPUTS = "inputs"  # store kinds: the first part of every object name
RESULTS = "results"
MASKS = "masks"


def result_name(key: str, fmt: str = "png") -> str:
    """A result's name in the store: its key and its format's extension (`<key>.png`)."""
    return key + FORMATS[fmt]


def result_names(key: str) -> list[str]:
    """Every name a result of `key` can have (one per format), for lookups by key alone."""
    return [key + ext for ext in FORMATS.values()]


def media_type(name: str) -> str:
    """The content type of a stored name: a result's or mask's format, else raw bytes."""
    for fmt, ext in FORMATS.items():
        if name.endswith(ext):
            return CONTENT_TYPES[fmt]
    return "application/octet-stream"


def mask_name(input_sha256: str, model: str) -> str:
    """The name of a model's masks of an input: computed once, shared by every output variant.

    Readable on purpose: prune finds the input (and so whether a job in flight needs the masks)
    from the name. PIPELINE_VERSION is part of it, as it is of every result key.
    """
    return f"{input_sha256}-{model}-v{PIPELINE_VERSION}.png"


def name_digest(name: str) -> str:
    """The leading SHA-256 of a stored name: a result's key, a mask's input digest."""
    return name[:64]


def object_name(kind: str, name: str) -> str:
    """Where an object lives in the store, relative to its root or prefix.

    Inputs: `inputs/ab/cd/<sha256>`; results: `results/ab/cd/<key>.png` (or .webp, .jpg, .zip);
    masks: `masks/ab/cd/<sha256>-<model>-v<pipeline>.png`.
    """
    return f"{kind}/{name[:2]}/{name[2:4]}/{name}"


def guard_key(key: str) -> str:
    """Redis key held while a job is queued or running, so identical submits enqueue once."""
    return f"{defaults.KEY_PREFIX}guard:{key}"


def mask_lock_key(name: str) -> str:
    """Redis key held by the pool process running the model for a mask (the others wait)."""
    return f"{defaults.KEY_PREFIX}masklock:{name}"


def attempts_key(key: str) -> str:
    """Redis key counting the pool processes a job killed, to stop jobs that crash workers."""
    return f"{defaults.KEY_PREFIX}attempts:{key}"


def starts_key(key: str) -> str:
    """Redis key counting a job's starts since it last finished (whole hosts lost with it)."""
    return f"{defaults.KEY_PREFIX}starts:{key}"


def counted_key(key: str) -> str:
    """Redis key naming the enqueue (guard token) whose end was last counted: a run that
    finishes the same enqueue again (a holder back after its lease was taken over) counts
    nothing."""
    return f"{defaults.KEY_PREFIX}counted:{key}"


def job_key(key: str) -> str:
    """Redis hash describing a job submitted over HTTP: model, args, created_at, base_url."""
    return f"{defaults.KEY_PREFIX}job:{key}"


def callbacks_key(key: str) -> str:
    """Redis set of the webhook URLs to notify when a job ends (emptied when they are sent)."""
    return f"{defaults.KEY_PREFIX}callbacks:{key}"


def input_refs_key(input_sha256: str) -> str:
    """Redis set of the job keys that still need an input blob (prune keeps it while non-empty)."""
    return f"{defaults.KEY_PREFIX}inputs:{input_sha256}"


def needed_inputs(kwargs: dict[str, Any]) -> list[str]:
    """The input digests a task's arguments name (its image, its bg_image's), read leniently:
    the end of a malformed task still releases what it names."""
    options = kwargs.get("options")
    background = options.get("bg_image") if isinstance(options, dict) else None
    return [sha for sha in (kwargs.get("input_sha256"), background) if isinstance(sha, str)]


def stage_key(stage: str) -> str:
    """Redis hash of a worker stage's latency histogram: `le:<bound>` counts, `sum`, `count`."""
    return f"{defaults.KEY_PREFIX}stage:{stage}"


STAGES = ("read", "decode", "inference", "encode", "write")  # of one computed result
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def wait_key(lane: str) -> str:
    """Redis hash of a lane's histogram of seconds from enqueue to start (as stage_key's)."""
    return f"{defaults.KEY_PREFIX}wait:{lane}"


def promoted_key(key: str) -> str:
    """Redis key naming the bulk enqueue (its guard token) of a job promoted to the interactive
    lane: that enqueue's message is dropped instead of let in. Expires with the guard's TTL."""
    return f"{defaults.KEY_PREFIX}promoted:{key}"


LANE_HEADER = "bgq_lane"  # message headers: the job's lane, bulk run, and enqueue time (epoch s)
RUN_HEADER = "bgq_run"
ENQUEUED_HEADER = "bgq_enqueued"
GUARD_HEADER = "bgq_guard"  # the enqueue's guard token (bgq/lanes.py's DISPATCH reads it)
WAIT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)

STATS_KEY = f"{defaults.KEY_PREFIX}stats"  # Redis hash of the cluster's counters (Counter)


class Counter(StrEnum):
    """A field of STATS_KEY: its value is the Redis field name (and the exporter's label)."""

    CACHE_HITS = "cache_hits"  # producers: submits answered from the store (added in batches)
    CACHE_MISSES = "cache_misses"  # producers: submits not in the store
    ENQUEUED = "enqueued"  # producers: tasks published
    COMPUTED = "computed"  # workers: jobs that computed their result
    SKIPPED = "skipped"  # workers: jobs whose result was in the store already
    FAILED = "failed"  # workers: jobs that failed for good
    INFERENCES = "inferences"  # workers: model runs (one per input and model)


OUTCOMES = (Counter.COMPUTED, Counter.SKIPPED, Counter.FAILED)  # of a job, counted once it ends

# The options of the release before roi, scale, fit_megapixels and bg_image, sent in every task
# message; a later option is sent only when set, since an older worker refuses (for good) a
# message with an option it does not know, and a rolling upgrade runs both releases at once.
BASE_OPTIONS = REMBG_FIELDS | frozenset(
    {
        "bgcolor",
        "format",
        "quality",
        "crop",
        "crop_margin",
        "canvas",
        "padding",
        "position",
    }
)


class TaskArgs(BaseModel):
    """The JSON keyword arguments of the `bgq.remove_background` task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    input_sha256: str
    model: str
    options: Options
    pipeline_version: str = PIPELINE_VERSION

    @property
    def output(self) -> str:
        """The result's name in the store."""
        return result_name(self.key, self.options.format)

    @property
    def inputs(self) -> list[str]:
        """The input blobs the job reads: its image, and its bg_image's."""
        return needed_inputs(self.to_kwargs())

    @property
    def masks(self) -> str:
        """The name of the masks this job derives its output from."""
        return mask_name(self.input_sha256, self.model)

    @classmethod
    def build(cls, input_sha256: str, model: str, options: Options) -> TaskArgs:
        """Arguments for a job on the given input digest, model and options."""
        check_model(model)
        return cls(
            key=cache_key(input_sha256, model, options),
            input_sha256=input_sha256,
            model=model,
            options=options,
        )

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> TaskArgs:
        """Validate a received message; anything inconsistent raises InvalidRequest."""
        try:
            args = cls.model_validate(kwargs)
        except ValidationError as exc:
            raise InvalidRequest(f"malformed task arguments: {exc.errors()[0]['msg']}") from None
        check_model(args.model)
        if args.pipeline_version != PIPELINE_VERSION:
            raise InvalidRequest(
                f"pipeline version {args.pipeline_version!r} does not match this worker's "
                f"{PIPELINE_VERSION!r}: producer and worker run different bgq versions"
            )
        if args.key != cache_key(args.input_sha256, args.model, args.options):
            raise InvalidRequest("task key does not match its input digest, model and options")
        return args

    def to_kwargs(self) -> dict[str, Any]:
        """JSON-serialisable keyword arguments for the task message: the options an older
        worker knows, and each later one only when set (a worker fills in the defaults)."""
        kwargs = self.model_dump(mode="json", exclude={"options"})
        base = set(BASE_OPTIONS)
        options = self.options.model_dump(mode="json", include=base)
        later = self.options.model_dump(mode="json", exclude=base, exclude_defaults=True)
        return kwargs | {"options": options | later}
