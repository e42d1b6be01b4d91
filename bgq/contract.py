"""The contract between producer and workers: cache key, store layout, task name and arguments.

Kept free of heavy imports (no rembg, no onnxruntime, no Celery) so that producers stay light.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


# Output formats: file extension and content type. WebP keeps alpha; JPEG is flattened.
FORMATS = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
Format = Literal["png", "webp", "jpeg"]
Position = Literal["center", "top", "bottom"]
# A length: "20px", "20" (pixels) or "5%", "2.5%" (of the subject's box, or of the canvas side).
LENGTH_PATTERN = r"^(0|[1-9][0-9]{0,4})(px)?$|^(0|[1-9][0-9]?|100)(\.[0-9]{1,2})?%$"
CANVAS_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"  # "WxH" in pixels


def parse_length(text: str) -> tuple[float, bool]:
    """(value, is_percent) of a length that matched LENGTH_PATTERN."""
    if text.endswith("%"):
        return float(text[:-1]), True
    return float(text.removesuffix("px")), False


def length_pixels(text: str, whole: int) -> int:
    """A length in pixels: itself, or its percentage of `whole` (rounded)."""
    value, percent = parse_length(text)
    return round(whole * value / 100) if percent else int(value)


def canonical_length(text: str) -> str:
    """One spelling per length, for the cache key: "20px", "5%", "2.5%"."""
    value, percent = parse_length(text)
    return f"{value:g}%" if percent else f"{value:g}px"


def parse_canvas(text: str) -> tuple[int, int]:
    """(width, height) of a canvas that matched CANVAS_PATTERN."""
    width, height = text.split("x")
    return int(width), int(height)


def check_model(name: str) -> str:
    """Return `name` if bgq can run that rembg model, else raise InvalidRequest."""
    if name not in MODELS:
        raise InvalidRequest(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return name


class Options(BaseModel):
    """rembg.remove() options bgq supports (defaults are rembg's), and how the output is shaped.

    Without crop or canvas and with png, the output is exactly rembg.remove()'s. The shaping
    transforms are documented in docs/output.md.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha_matting: bool = False
    alpha_matting_foreground_threshold: Threshold = 240
    alpha_matting_background_threshold: Threshold = 10
    alpha_matting_erode_size: Annotated[int, Field(ge=0, le=1000)] = 10
    only_mask: bool = False
    post_process_mask: bool = False
    bgcolor: tuple[Threshold, Threshold, Threshold, Threshold] | None = None
    format: Format = "png"
    quality: Annotated[int, Field(ge=1, le=100)] | None = None  # webp and jpeg; png ignores it
    crop: bool = False
    crop_margin: str = "0"
    canvas: str | None = None
    padding: str = "0"
    position: Position = "center"

    @field_validator("alpha_matting", "only_mask", "post_process_mask", "crop", mode="before")
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

    @field_validator("canvas")
    @classmethod
    def _check_canvas(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(CANVAS_PATTERN, value):
            raise ValueError("must be WIDTHxHEIGHT in pixels, such as 1000x1000")
        if max(parse_canvas(value)) > defaults.CANVAS_MAX_SIDE:
            raise ValueError(f"each side must be at most {defaults.CANVAS_MAX_SIDE} px")
        return value

    @field_validator("crop_margin", "padding")
    @classmethod
    def _check_length(cls, value: str) -> str:
        if not re.fullmatch(LENGTH_PATTERN, value):
            raise ValueError("must be pixels (such as 20px) or a percentage up to 100 (5%)")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Options:
        if parse_length(self.crop_margin)[0] and not self.crop:
            raise ValueError("crop_margin: applies only with crop=true")
        if self.canvas is None:
            if parse_length(self.padding)[0]:
                raise ValueError("padding: applies only with a canvas")
            if self.position != "center":
                raise ValueError("position: applies only with a canvas")
            return self
        width, height = parse_canvas(self.canvas)
        value, percent = parse_length(self.padding)
        if (value >= 50) if percent else (2 * value >= min(width, height)):
            raise ValueError("padding: must be under half the canvas side")
        return self

    @property
    def shaped(self) -> bool:
        """True when the output is cropped or put on a canvas (not rembg's frame)."""
        return self.crop or self.canvas is not None

    @property
    def effective_quality(self) -> int:
        return self.quality if self.quality is not None else defaults.QUALITY

    @classmethod
    def parse(cls, values: dict[str, Any] | None = None) -> Options:
        """Validate user-supplied options; a bad one raises InvalidRequest naming it."""
        try:
            return cls(**(values or {}))
        except ValidationError as exc:
            problems = "; ".join(
                ": ".join(
                    [".".join(str(p) for p in e["loc"])] * bool(e["loc"])
                    + [e["msg"].removeprefix("Value error, ")]
                )
                for e in exc.errors()
            )
            raise InvalidRequest(f"invalid options: {problems}") from None

    def canonical(self) -> dict[str, Any]:
        """The options that can change the output, as they enter the cache key.

        rembg ignores the alpha-matting thresholds unless alpha_matting is on, and ignores
        alpha_matting and bgcolor when only_mask is on; leaving those out lets equivalent
        requests share one cache entry.
        Shaping options enter only when they are not the defaults, so a plain PNG keeps the
        key it had before they existed.
        """
        out: dict[str, Any]
        if self.only_mask:
            out = {"only_mask": True, "post_process_mask": self.post_process_mask}
        else:
            out = {
                "alpha_matting": self.alpha_matting,
                "post_process_mask": self.post_process_mask,
                "bgcolor": list(self.bgcolor) if self.bgcolor else None,
            }
        if self.alpha_matting and not self.only_mask:
            out["alpha_matting_foreground_threshold"] = self.alpha_matting_foreground_threshold
            out["alpha_matting_background_threshold"] = self.alpha_matting_background_threshold
            out["alpha_matting_erode_size"] = self.alpha_matting_erode_size
        if self.format != "png":
            out["format"] = self.format
            out["quality"] = self.effective_quality
        if self.crop:
            out["crop"] = True
            out["crop_margin"] = canonical_length(self.crop_margin)
        if self.canvas is not None:
            out["canvas"] = self.canvas
            out["padding"] = canonical_length(self.padding)
            out["position"] = self.position
        return out

    def rembg_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for rembg.remove(); a shaped output gets its bgcolor afterwards."""
        return self.model_dump(
            include={
                "alpha_matting",
                "alpha_matting_foreground_threshold",
                "alpha_matting_background_threshold",
                "alpha_matting_erode_size",
                "only_mask",
                "post_process_mask",
            }
        ) | {"bgcolor": None if self.shaped else self.bgcolor}


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

    Inputs: `inputs/ab/cd/<sha256>`; results: `results/ab/cd/<key>.png` (or .webp, .jpg);
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
# computed, skipped, failed and inferences (model runs) (workers).
STATS_KEY = f"{defaults.KEY_PREFIX}stats"  # Redis hash of counters (computed, skipped, failed)


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
        """JSON-serialisable keyword arguments for the task message."""
        return self.model_dump(mode="json")
