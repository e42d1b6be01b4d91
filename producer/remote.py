"""S3 sources and destinations of `bgq ingest` (`s3://BUCKET/PREFIX`), with the store's S3
settings (BGQ_S3_ENDPOINT_URL, BGQ_S3_REGION, the AWS credential chain)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from bgq.contract import media_type
from bgq.store import Store, list_s3_objects, make_s3_client, raise_s3_error, s3_error_code
from bgq.urls import split_s3_url
from producer.catalog import InputError, Item, output_names

if TYPE_CHECKING:
    from bgq.settings import Settings


class S3Prefix:
    """Objects under one bucket and key prefix."""

    def __init__(self, settings: Settings, url: str) -> None:
        self.client: Any = make_s3_client(settings)
        self.bucket, self.prefix = split_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}"

    def keys(self, exclude: str | None = None) -> list[str]:
        """Every visible object key under the prefix, relative to it, in key order; none under
        the `s3://` URL `exclude`."""
        found = []
        for obj in list_s3_objects(self.client, self.bucket, self.prefix):
            rel = obj["Key"][len(self.prefix) :]
            hidden = any(part.startswith(".") for part in rel.split("/"))
            if rel and not rel.endswith("/") and not hidden:
                found.append(rel)
        if exclude is not None:  # an output prefix inside this one is not an input
            bucket, skip = split_s3_url(exclude)
            if (
                bucket == self.bucket
                and len(skip) > len(self.prefix)
                and skip.startswith(self.prefix)
            ):
                found = [k for k in found if not (self.prefix + k).startswith(skip)]
        return found

    def catalog(self, exclude: str | None = None, ext: str = ".png") -> tuple[int, Iterator[Item]]:
        """The inputs under the prefix as ingest Items, outputs mirrored like a folder's."""
        folders: dict[str, list[str]] = {}
        for rel in self.keys(exclude):
            folder, _, name = rel.rpartition("/")
            folders.setdefault(folder, []).append(name)
        items = [
            Item(f"{self.url}{folder}/{name}" if folder else f"{self.url}{name}", out)
            for folder in sorted(folders)
            for name, out in zip(
                folders[folder],
                [str(PurePosixPath(folder, n)) for n in output_names(folders[folder], ext)],
                strict=True,
            )
        ]
        return len(items), iter(items)

    def read(self, source: str) -> bytes:
        """The bytes of one listed input (`s3://BUCKET/KEY`); a vanished one is InputError."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, key = source.removeprefix("s3://").partition("/")
        try:
            return bytes(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())
        except ClientError as exc:
            if s3_error_code(exc) in ("NoSuchKey", "404"):
                raise InputError("not found (deleted since it was listed?)") from None
            if s3_error_code(exc) in (
                "NoSuchBucket",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
            ):
                raise_s3_error(exc, "read", source)  # the whole source: stop the run
            raise InputError(f"cannot read: {s3_error_code(exc)}: {exc}") from None  # this object
        except BotoCoreError as exc:
            raise_s3_error(exc, "read", source)

    def place(self, store: Store, output: str, name: str) -> str:
        """Put a result under the prefix: a server-side copy from an S3 store, else an upload."""
        from botocore.exceptions import BotoCoreError, ClientError

        dest = self.prefix + name
        source = store.s3_object(output)
        try:
            if source is not None:
                self.client.copy_object(
                    Bucket=self.bucket,
                    Key=dest,
                    CopySource={"Bucket": source[0], "Key": source[1]},
                )
            else:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=dest,
                    Body=store.read_output(output),
                    ContentType=media_type(output),
                )
        except (BotoCoreError, ClientError) as exc:
            raise_s3_error(exc, "write", f"s3://{self.bucket}/{dest}")
        return f"s3://{self.bucket}/{dest}"
