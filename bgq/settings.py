"""The one settings object, read from BGQ_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bgq import defaults, quotas, urls
from bgq.errors import ConfigError
from bgq.units import parse_duration, parse_size

ENV_PREFIX = "BGQ_"


def default_home() -> Path:
    """`$XDG_DATA_HOME/bgq`, i.e. `~/.local/share/bgq` when XDG_DATA_HOME is unset."""
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(xdg) / "bgq"


class Settings(BaseSettings):
    """bgq's configuration; every field is the environment variable BGQ_<FIELD>."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True
    )

    redis_url: str | None = None  # unset: the embedded redis-server of `bgq up`
    redis_tls_ca: Path | None = None  # CA bundle checking a rediss:// server; unset: system CAs
    redis_tls_cert: Path | None = None  # client certificate for rediss:// (mutual TLS)
    redis_tls_key: Path | None = None  # its private key
    redis_sentinel_master: str | None = None  # master name, needed with sentinel:// URLs
    broker_retry_seconds: Annotated[float, Field(ge=0)] = defaults.BROKER_RETRY_SECONDS
    home: Path = Field(default_factory=default_home)
    models_dir: Path | None = None  # unset: $BGQ_HOME/models
    model: str = defaults.MODEL
    models: str | None = None  # comma-separated models a worker serves; unset: just BGQ_MODEL
    concurrency: Annotated[int, Field(ge=1)] = Field(default_factory=lambda: os.cpu_count() or 1)
    ort_threads: Annotated[int, Field(ge=1)] = defaults.ORT_THREADS
    ort_arena: bool = defaults.ORT_ARENA
    lease: Annotated[int, Field(ge=6)] = defaults.LEASE  # s; the same on every worker
    max_tasks_per_child: Annotated[int, Field(ge=1)] = defaults.MAX_TASKS_PER_CHILD
    shutdown_grace: Annotated[float, Field(ge=0)] = defaults.SHUTDOWN_GRACE  # seconds (SIGTERM)
    max_memory_per_child_mb: Annotated[int, Field(ge=64)] = defaults.MAX_MEMORY_PER_CHILD_MB
    max_megapixels: Annotated[float, Field(gt=0)] = defaults.MAX_MEGAPIXELS
    png_encoder: Literal["fast", "pillow"] = defaults.PNG_ENCODER
    png_compress_level: Annotated[int, Field(ge=0, le=9)] = defaults.PNG_COMPRESS_LEVEL
    max_upload_mb: Annotated[float, Field(gt=0)] = defaults.MAX_UPLOAD_MB
    api_keys: str | None = None  # comma-separated bearer keys; unset: the API needs no auth
    api_limits: str | None = None  # per-key limits (bgq.quotas's format); unset: none
    public_url: str | None = None  # the API's URL as clients see it; unset: from each request
    webhook_secret: str | None = None  # HMAC-SHA256 key signing webhook bodies
    webhook_allow_private: bool = False  # allow callbacks to loopback/private/link-local hosts
    webhook_timeout: Annotated[float, Field(gt=0)] = defaults.WEBHOOK_TIMEOUT  # s per step, 2x all
    webhook_max_retries: Annotated[int, Field(ge=0)] = defaults.WEBHOOK_MAX_RETRIES
    fetch_allow_private: bool = False  # allow image URLs on loopback/private/link-local hosts
    fetch_timeout: Annotated[float, Field(gt=0)] = defaults.FETCH_TIMEOUT  # seconds, whole fetch
    flower_basic_auth: str | None = None  # user:password for Flower
    cache_max_age: float | None = None  # seconds since last use after which prune drops a result
    cache_max_size: int | None = None  # bytes of results prune keeps at most
    cache_keep_inputs: bool = False  # keep input blobs after their jobs are done
    store_url: str | None = (
        None  # unset: $BGQ_HOME/store; a path, file:///abs or s3://bucket/prefix
    )
    s3_endpoint_url: str | None = None  # unset: AWS; else MinIO, Ceph, R2, a local S3 server
    s3_region: str | None = None  # unset: the AWS chain's (AWS_REGION, profile), else us-east-1
    s3_timeout: Annotated[float, Field(gt=0)] = defaults.S3_TIMEOUT  # seconds per S3 request try
    result_redirect: Literal["stream", "presigned"] = "stream"  # GET .../result on S3
    presign_seconds: Annotated[int, Field(ge=1, le=604800)] = defaults.PRESIGN_SECONDS

    @field_validator("cache_max_age", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return None if value is None else parse_duration(value)  # type: ignore[arg-type]

    @field_validator("cache_max_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return None if value is None else parse_size(value)  # type: ignore[arg-type]

    @field_validator("flower_basic_auth")
    @classmethod
    def _user_password(cls, value: str | None) -> str | None:
        if value is not None and (":" not in value or value.startswith(":")):
            raise ValueError("must be user:password")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        return None if url is None else urls.check_redis_url(url)

    @field_validator("store_url")
    @classmethod
    def _store_scheme(cls, url: str | None) -> str | None:
        return None if url is None else urls.check_store_url(url)

    @field_validator("api_limits")
    @classmethod
    def _limits(cls, text: str | None) -> str | None:
        if text is not None:
            quotas.parse_limits(text)
        return text

    @model_validator(mode="after")
    def _limited_keys(self) -> Settings:
        ids = {quotas.key_id(key) for key in self.api_key_list}
        if self.api_limits is not None and not ids:
            raise ValueError("BGQ_API_LIMITS needs BGQ_API_KEYS: limits are per key")
        for who in self.api_limit_table:
            if who != quotas.EVERY_KEY and who not in ids:
                raise ValueError(
                    f"BGQ_API_LIMITS names key id {who}, which is no key of BGQ_API_KEYS "
                    "(`bgq api --key-ids` prints their ids)"
                )
        return self

    @model_validator(mode="after")
    def _redis_companions(self) -> Settings:
        url = self.redis_url or ""
        if urls.is_sentinel(url) and not self.redis_sentinel_master:
            raise ValueError("BGQ_REDIS_SENTINEL_MASTER must name the master of a sentinel:// URL")
        tls = self.redis_tls_ca or self.redis_tls_cert or self.redis_tls_key
        if tls and not urls.is_tls(url):
            raise ValueError("BGQ_REDIS_TLS_* settings need a rediss:// BGQ_REDIS_URL")
        if bool(self.redis_tls_cert) != bool(self.redis_tls_key):
            raise ValueError("BGQ_REDIS_TLS_CERT and BGQ_REDIS_TLS_KEY go together")
        return self

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if choices := defaults.unknown_model_hint(name):
            raise ValueError(f"unknown model; {choices}")
        return name

    @field_validator("models")
    @classmethod
    def _served_models(cls, text: str | None) -> str | None:
        if text is None:
            return None
        names = parse_models(text)
        if not names:
            raise ValueError("must name at least one model")
        if len(set(names)) != len(names):
            raise ValueError("names a model twice")
        for name in names:
            if choices := defaults.unknown_model_hint(name):
                raise ValueError(f"unknown model {name!r}; {choices}")
        return ",".join(names)

    @field_validator("home", "models_dir", "redis_tls_ca", "redis_tls_cert", "redis_tls_key")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        return None if path is None else path.expanduser().absolute()

    @property
    def served_models(self) -> list[str]:
        """The models a worker serves (BGQ_MODELS, in its order), else just BGQ_MODEL."""
        return parse_models(self.models) if self.models else [self.model]

    @property
    def max_upload_bytes(self) -> int:
        """BGQ_MAX_UPLOAD_MB in bytes: the largest upload or fetched image."""
        return int(self.max_upload_mb * 2**20)

    @property
    def api_key_list(self) -> list[str]:
        """The bearer keys of BGQ_API_KEYS (empty: no auth)."""
        return [k.strip() for k in (self.api_keys or "").split(",") if k.strip()]

    @property
    def api_limit_table(self) -> quotas.Table:
        """BGQ_API_LIMITS: each key id's (or `*`'s) limits by lane and kind."""
        return quotas.parse_limits(self.api_limits) if self.api_limits else {}

    @property
    def store_dir(self) -> Path:
        """Root of a filesystem store: BGQ_STORE_URL's path, else $BGQ_HOME/store."""
        url = self.store_url
        if url is None or urls.is_s3(url):
            return self.home / "store"
        return Path(urls.store_path(url)).expanduser().absolute()

    @property
    def store_bucket(self) -> tuple[str, str] | None:
        """(bucket, prefix) of an S3 store (prefix "" or ending in "/"); None for a directory."""
        if self.store_url is None or not urls.is_s3(self.store_url):
            return None
        return urls.split_s3_url(self.store_url)

    @property
    def run_dir(self) -> Path:
        """Runtime files: the embedded redis-server's state, data and log."""
        return self.home / "run"

    @property
    def model_home(self) -> Path:
        """Where model weights live; rembg is pointed here through U2NET_HOME."""
        return self.models_dir or self.home / "models"


def parse_models(text: str) -> list[str]:
    """`u2netp, u2net` -> ["u2netp", "u2net"]: a BGQ_MODELS list, blanks dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


def settings_env(settings: Settings) -> dict[str, str]:
    """The BGQ_* environment that reproduces `settings` in a child process."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            env[ENV_PREFIX + name.upper()] = text
    return env


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment; a bad value raises ConfigError naming it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # a rule across settings: its message names them
                problems.append(msg)
                continue
            field = str(err["loc"][0])
            name = ENV_PREFIX + field.upper()
            value = _shown(field, os.environ.get(name, err.get("input")))
            problems.append(f"{name}={value!r}: {msg}")
        raise ConfigError("invalid setting " + "; ".join(problems)) from None


# Never shown in errors: BGQ_API_LIMITS names keys by id, but a key written there by mistake
# would otherwise be printed by every process that reads the settings.
SECRET_FIELDS = {"api_keys", "api_limits", "webhook_secret", "flower_basic_auth"}


def _shown(field: str, value: object) -> object:
    """A setting's value as an error message may show it: no password, key or secret."""
    if field in SECRET_FIELDS and value is not None:
        return "(hidden)"
    if field == "redis_url" and isinstance(value, str):
        return urls.safe_url(value)
    return value
