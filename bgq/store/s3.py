"""The S3 store: objects under s3://BUCKET/PREFIX on AWS or any S3-compatible server.

One PUT writes an object whole, so no reader ever sees part of it; a result's LastModified is
its last use, re-stamped on a hit by a server-side self-copy (as the filesystem store re-stamps
a file's mtime). Errors that can pass (timeouts, 5xx, throttling, a dropped connection) are
retried by botocore, then raised as StoreError (transient); a missing bucket or refused
credentials raise ConfigError naming the setting (permanent).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from bgq import defaults
from bgq.contract import INPUTS, RESULTS, media_type, object_name
from bgq.errors import ConfigError, NotInStore, StoreError
from bgq.store.base import Entry, Store

if TYPE_CHECKING:
    from bgq.settings import Settings

DENIED = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AuthorizationHeaderMalformed",
        "403",
    }
)
MISSING_BUCKET = frozenset({"NoSuchBucket"})
# A create-only PUT refused because the object exists, or another such PUT is under way.
EXISTS = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
UNCONDITIONAL = frozenset({"NotImplemented", "501"})  # the server does not know If-None-Match
CREDENTIALS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE"


def make_s3_client(settings: Settings, attempts: int = defaults.S3_MAX_ATTEMPTS) -> Any:
    """A boto3 S3 client from BGQ_S3_* and the standard AWS credential chain."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    other = settings.s3_endpoint_url is not None  # MinIO, Ceph, R2...: not AWS itself
    config = Config(
        connect_timeout=min(defaults.S3_CONNECT_TIMEOUT, settings.s3_timeout),
        read_timeout=settings.s3_timeout,
        retries={"max_attempts": attempts, "mode": "standard"},
        max_pool_connections=defaults.S3_POOL_CONNECTIONS,
        s3={"addressing_style": "path"} if other else None,
        # Some S3-compatible servers refuse the CRC checksum headers newer botocore sends.
        request_checksum_calculation="when_required" if other else "when_supported",
        response_checksum_validation="when_required" if other else "when_supported",
    )
    return session.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region or session.region_name or "us-east-1",
        config=config,
    )


def s3_error_code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError ("" for other errors)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def raise_s3_error(exc: Exception, doing: str, where: str) -> NoReturn:
    """Re-raise a botocore error: ConfigError for a missing bucket or refused credentials,
    StoreError (transient) for the rest. Messages never carry credentials."""
    from botocore.exceptions import NoCredentialsError

    code = s3_error_code(exc)
    if isinstance(exc, NoCredentialsError):
        raise ConfigError(f"no AWS credentials for {where}: set {CREDENTIALS}") from None
    if code in MISSING_BUCKET:
        raise ConfigError(f"the bucket of {where} does not exist") from None
    if code in DENIED:
        raise ConfigError(
            f"{where}: access refused ({code}); check the credentials ({CREDENTIALS})"
        ) from None
    raise StoreError(f"cannot {doing} {where}: {exc}") from exc


def list_s3_objects(client: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Every object (Key, Size, LastModified) under a key prefix, page by page, in key order."""
    from botocore.exceptions import BotoCoreError, ClientError

    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    try:
        for page in pages:
            yield from page.get("Contents", ())
    except (BotoCoreError, ClientError) as exc:
        raise_s3_error(exc, "list", f"s3://{bucket}/{prefix}")


class S3Store(Store):
    """The store in one bucket, under one key prefix, laid out by `object_name`."""

    def __init__(self, settings: Settings, bucket: str, prefix: str) -> None:
        super().__init__()
        self.settings = settings
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}"
        self._client: Any = None
        self._pid = 0
        self._probe: Any = None  # a one-try client for check(): a check reports, never waits
        self._probe_pid = 0
        self._conditional = True  # the server honours If-None-Match on PUT (until it says no)

    @property
    def client(self) -> Any:
        """This process's client: made on first use, and again after a fork."""
        if self._client is None or self._pid != os.getpid():
            self._client, self._pid = make_s3_client(self.settings), os.getpid()
        return self._client

    def key(self, kind: str, name: str) -> str:
        return self.prefix + object_name(kind, name)

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        endpoint = self.settings.s3_endpoint_url
        try:
            if self._probe is None or self._probe_pid != os.getpid():
                self._probe, self._probe_pid = (
                    make_s3_client(self.settings, attempts=1),
                    os.getpid(),
                )
            self._probe.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if s3_error_code(exc) in ("404", "NoSuchBucket"):
                raise ConfigError(
                    f"BGQ_STORE_URL={self.url}: bucket {self.bucket!r} does not exist"
                ) from None
            raise_s3_error(exc, "reach", self.url)
        except BotoCoreError as exc:
            if "credentials" in type(exc).__name__.lower():
                raise_s3_error(exc, "reach", self.url)
            where = f"BGQ_S3_ENDPOINT_URL={endpoint}" if endpoint else "the AWS S3 endpoint"
            raise ConfigError(f"{where} is unreachable: {exc}") from None

    def stat(self, kind: str, name: str) -> Entry | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(kind, name))
        except ClientError as exc:
            if s3_error_code(exc) in ("404", "NoSuchKey"):
                return None
            raise_s3_error(exc, "stat", self.url + object_name(kind, name))
        except BotoCoreError as exc:
            raise_s3_error(exc, "stat", self.url + object_name(kind, name))
        return Entry(kind, name, head["ContentLength"], _seconds(head["LastModified"]))

    def read(self, kind: str, name: str) -> bytes:
        return b"".join(self._body(kind, name))

    def chunks(self, name: str) -> Iterator[bytes]:
        return self._body(RESULTS, name)

    def _body(self, kind: str, name: str) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        where = self.url + object_name(kind, name)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(kind, name))["Body"]
            yield from body.iter_chunks(defaults.STORE_STREAM_CHUNK)
        except ClientError as exc:
            if s3_error_code(exc) == "NoSuchKey":
                raise NotInStore(f"{where} not found in the store") from None
            raise_s3_error(exc, "read", where)
        except BotoCoreError as exc:
            raise_s3_error(exc, "read", where)

    def write(self, kind: str, name: str, data: bytes, if_none_match: str | None = None) -> None:
        """One PUT; with `if_none_match`, a refused condition is raised as botocore's error."""
        extra = {"IfNoneMatch": if_none_match} if if_none_match else {}
        self._call(
            "put_object",
            kind,
            name,
            raw=bool(if_none_match),
            Body=data,
            ContentType=media_type(name),
            **extra,
        )

    def put_input(self, input_sha256: str, data: bytes) -> None:
        """One conditional PUT (If-None-Match: *) writes a new blob once; an existing one is
        stamped as on any store. A server that does not know the condition gets HEAD + PUT."""
        from botocore.exceptions import ClientError

        if self._conditional:
            try:
                self.write(INPUTS, input_sha256, data, if_none_match="*")
                return
            except ClientError as exc:
                if s3_error_code(exc) in UNCONDITIONAL:
                    self._conditional = False
                elif s3_error_code(exc) not in EXISTS:
                    raise_s3_error(exc, "put", self.url + object_name(INPUTS, input_sha256))
        super().put_input(input_sha256, data)

    def touch(self, kind: str, name: str) -> None:
        self._call(
            "copy_object",
            kind,
            name,
            CopySource={"Bucket": self.bucket, "Key": self.key(kind, name)},
            MetadataDirective="REPLACE",
            Metadata={"bgq-used": str(int(time.time()))},
            ContentType=media_type(name),
        )

    def delete(self, kind: str, name: str) -> None:
        self._call("delete_object", kind, name)

    def _call(self, method: str, kind: str, name: str, raw: bool = False, **kwargs: Any) -> Any:
        """One client call on an object; errors mapped (`raw`: a ClientError is left as is)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            call = getattr(self.client, method)
            return call(Bucket=self.bucket, Key=self.key(kind, name), **kwargs)
        except ClientError as exc:
            if raw:
                raise
            raise_s3_error(exc, method.replace("_", " "), self.url + object_name(kind, name))
        except BotoCoreError as exc:
            raise_s3_error(exc, method.replace("_", " "), self.url + object_name(kind, name))

    def scan(self, kind: str) -> Iterator[Entry]:
        for obj in list_s3_objects(self.client, self.bucket, f"{self.prefix}{kind}/"):
            base = obj["Key"].rsplit("/", 1)[-1]
            if base and not base.startswith("."):
                name = base
                yield Entry(kind, name, obj["Size"], _seconds(obj["LastModified"]))

    def s3_object(self, name: str) -> tuple[str, str]:
        return self.bucket, self.key(RESULTS, name)

    def presigned_url(self, name: str, seconds: int) -> str:
        return str(
            self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self.key(RESULTS, name)},
                ExpiresIn=seconds,
            )
        )


def _seconds(moment: Any) -> float:
    """Whole seconds: HEAD's Last-Modified has no fraction, LIST's may have one."""
    return float(int(moment.timestamp()))
