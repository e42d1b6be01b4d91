"""The URLs bgq reads from settings: Redis (plain, TLS, Sentinel) and the store (path, file, s3).

Standard library only, so that settings can check them and anything can print them safely.
"""

from __future__ import annotations

from urllib.parse import urlsplit

REDIS_SCHEMES = ("redis://", "rediss://", "sentinel://")
SENTINEL_SEPARATOR = ";"  # between the sentinels of a sentinel:// URL (Celery's form)
SENTINEL_PORT = 26379
S3_SCHEME = "s3://"
FILE_SCHEME = "file://"


def safe_url(url: str) -> str:
    """The URL with any password masked (each part of a sentinel:// list), for logs and output."""
    return SENTINEL_SEPARATOR.join(_mask(part) for part in url.split(SENTINEL_SEPARATOR))


def _mask(url: str) -> str:
    """One URL with its password, if any, shown as `**`."""
    try:
        split = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if split.password is None:
        return url
    userinfo, host = split.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return split._replace(netloc=f"{user}:**@{host}").geturl()


def is_sentinel(url: str) -> bool:
    """Whether the URL names Sentinels (which then name the master) rather than a server."""
    return url.startswith("sentinel://")


def is_tls(url: str) -> bool:
    """Whether the Redis URL asks for TLS (`rediss://`)."""
    return url.startswith("rediss://")


def check_redis_url(url: str) -> str:
    """The URL if it is one of BGQ_REDIS_URL's forms, else ValueError saying which they are."""
    if not url.startswith(REDIS_SCHEMES):
        raise ValueError("must start with redis://, rediss:// or sentinel://")
    return url


def is_s3(url: str) -> bool:
    """Whether the store URL names an S3 bucket (`s3://BUCKET[/PREFIX]`)."""
    return url.startswith(S3_SCHEME)


def check_store_url(url: str) -> str:
    """The URL if it is one of BGQ_STORE_URL's forms, else ValueError saying what is wrong."""
    if is_s3(url):
        if not url.removeprefix(S3_SCHEME).split("/", 1)[0]:
            raise ValueError("s3:// needs a bucket: s3://BUCKET[/PREFIX]")
    elif url.startswith(FILE_SCHEME):
        if not url.removeprefix(FILE_SCHEME).startswith("/"):
            raise ValueError("file:// needs an absolute path: file:///abs/path")
    elif "://" in url:
        raise ValueError("must be a path, file:///abs/path or s3://BUCKET[/PREFIX]")
    return url


def store_path(url: str) -> str:
    """The directory of a path or `file://` store URL, as written (not yet expanded)."""
    return url.removeprefix(FILE_SCHEME)


def split_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix) of `s3://BUCKET[/PREFIX]`; the prefix is "" or ends in "/"."""
    bucket, _, prefix = url.removeprefix(S3_SCHEME).partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""
