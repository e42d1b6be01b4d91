"""The contract between producer and workers: cache key, store layout, task name and arguments.

Kept free of heavy imports (no rembg, no onnxruntime, no Celery) so that producers stay light.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bgq import defaults
from bgq.errors import InvalidRequest

# Bump whenever output pixels could change for the same input, model and options (the rembg
# pin in pyproject.toml, or bgq's own pipeline code): old cache entries then stop matching.
PIPELINE_VERSION = "1"

TASK_NAME = "bgq.remove_background"
QUEUE = defaults.QUEUE
WEBHOOK_TASK_NAME = "bgq.deliver_webhook"  # kwargs: url, body (the job JSON, as sent)
WEBHOOK_QUEUE = f"{defaults.QUEUE}.webhooks"  # kept apart so deliveries skip the image backlog
PRUNE_TASK_NAME = "bgq.prune_cache"  # no arguments: the worker's BGQ_CACHE_* settings apply
MAINTENANCE_QUEUE = f"{defaults.QUEUE}.maintenance"

# rembg models that run locally from a name alone (no custom weights path, prompt or credentials).
MODELS = frozenset(
    {
        "birefnet-cod",
        "birefnet-dis",
        "birefnet-general",
        "birefnet-general-fp16",
        "birefnet-general-lite",
        "birefnet-hrsod",
        "birefnet-massive",
        "birefnet-portrait",
        "bria-rmbg",
        "isnet-anime",
        "isnet-general-use",
        "silueta",
        "u2net",
        "u2net_cloth_seg",
        "u2net_human_seg",
        "u2netp",
    }
)

Threshold = Annotated[int, Field(ge=0, le=255)]
_BYTE = " *(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9]) *"  # 0-255: no sign, no leading zero
# bgcolor as text (the HTTP API's form): "r,g,b,a"; the same pattern is in the OpenAPI schema.
BGCOLOR_PATTERN = f"^{_BYTE},{_BYTE},{_BYTE},{_BYTE}$"


def check_model(name: str) -> str:
    """Return `name` if bgq can run that rembg model, else raise InvalidRequest."""
    if name not in MODELS:
        raise InvalidRequest(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return name


class Options(BaseModel):
    """rembg.remove() options bgq supports; defaults are rembg's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha_matting: bool = False
    alpha_matting_foreground_threshold: Threshold = 240
    alpha_matting_background_threshold: Threshold = 10
    alpha_matting_erode_size: Annotated[int, Field(ge=0, le=1000)] = 10
    only_mask: bool = False
    post_process_mask: bool = False
    bgcolor: tuple[Threshold, Threshold, Threshold, Threshold] | None = None

    @field_validator("alpha_matting", "only_mask", "post_process_mask", mode="before")
    @classmethod
    def _parse_bool(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("true", "false"):
            raise ValueError("must be true or false")
        return value

    @field_validator("bgcolor", mode="before")
    @classmethod
    def _parse_bgcolor(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not re.fullmatch(BGCOLOR_PATTERN, value):
                raise ValueError("must be r,g,b,a: four integers from 0 to 255")
            return tuple(part.strip(" ") for part in value.split(","))
        return value

    @classmethod
    def parse(cls, values: dict[str, Any] | None = None) -> Options:
        """Validate user-supplied options; a bad one raises InvalidRequest naming it."""
        try:
            return cls(**(values or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}"
                for e in exc.errors()
            )
            raise InvalidRequest(f"invalid options: {problems}") from None

    def canonical(self) -> dict[str, Any]:
        """The options that can change the output, as they enter the cache key.

        rembg ignores the alpha-matting thresholds unless alpha_matting is on, and ignores
        alpha_matting and bgcolor when only_mask is on; leaving those out lets equivalent
        requests share one cache entry.
        """
        if self.only_mask:
            return {"only_mask": True, "post_process_mask": self.post_process_mask}
        out: dict[str, Any] = {
            "alpha_matting": self.alpha_matting,
            "post_process_mask": self.post_process_mask,
            "bgcolor": list(self.bgcolor) if self.bgcolor else None,
        }
        if self.alpha_matting:
            out["alpha_matting_foreground_threshold"] = self.alpha_matting_foreground_threshold
            out["alpha_matting_background_threshold"] = self.alpha_matting_background_threshold
            out["alpha_matting_erode_size"] = self.alpha_matting_erode_size
        return out

    def rembg_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for rembg.remove()."""
        return self.model_dump()


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


def object_name(kind: str, name: str) -> str:
    """Where an object lives in the store, relative to its root or prefix.

    Inputs: `inputs/ab/cd/<sha256>`; results: `results/ab/cd/<key>.png`.
    """
    suffix = ".png" if kind == RESULTS else ""
    return f"{kind}/{name[:2]}/{name[2:4]}/{name}{suffix}"


def guard_key(key: str) -> str:
    """Redis key held while a job is queued or running, so identical submits enqueue once."""
    return f"{defaults.KEY_PREFIX}guard:{key}"


def attempts_key(key: str) -> str:
    """Redis key counting a job's deliveries that started, to stop jobs that crash workers."""
    return f"{defaults.KEY_PREFIX}attempts:{key}"


def job_key(key: str) -> str:
    """Redis hash describing a job submitted over HTTP: model, args, created_at, base_url."""
    return f"{defaults.KEY_PREFIX}job:{key}"


def callbacks_key(key: str) -> str:
    """Redis set of the webhook URLs to notify when a job ends (emptied when they are sent)."""
    return f"{defaults.KEY_PREFIX}callbacks:{key}"


def input_refs_key(input_sha256: str) -> str:
    """Redis set of the job keys that still need an input blob (prune keeps it while non-empty)."""
    return f"{defaults.KEY_PREFIX}inputs:{input_sha256}"


def stage_key(stage: str) -> str:
    """Redis hash of a worker stage's latency histogram: `le:<bound>` counts, `sum`, `count`."""
    return f"{defaults.KEY_PREFIX}stage:{stage}"


STAGES = ("read", "decode", "inference", "encode", "write")  # of one computed result
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Counters in STATS_KEY: cache_hits and cache_misses (producers), enqueued (producers),
# computed, skipped and failed (workers).
STATS_KEY = f"{defaults.KEY_PREFIX}stats"  # Redis hash of counters (computed, skipped, failed)


class TaskArgs(BaseModel):
    """The JSON keyword arguments of the `bgq.remove_background` task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    input_sha256: str
    model: str
    options: Options
    pipeline_version: str = PIPELINE_VERSION

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
        """JSON-serialisable keyword arguments for the task message."""
        return self.model_dump(mode="json")
