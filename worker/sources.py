"""A scan's source (a folder or an S3 prefix, parsed from what the user typed) and reading one
object's bytes from it.

A reader reads what it is handed, by (bucket, key), and only the version that was listed (S3:
``If-Match`` with the listed ETag; a folder: its size and time), refusing anything larger than
``CELEBSCAN_MAX_IMAGE_BYTES`` unread. For a local folder the bucket is the folder's absolute path
and the key is relative to it. Listing a source is ``worker/listing.py``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from worker.aws import AWS_ERRORS, client, translate
from worker.errors import (
    AccessDeniedError,
    ConfigurationError,
    ImageTooLargeError,
    ObjectChangedError,
    ObjectMissingError,
)
from worker.listing import file_etag
from worker.settings import Settings

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class Source:
    """Where a scan's images are, parsed once: ``bucket`` is the S3 bucket or the folder's
    absolute path, ``prefix`` the part of an ``s3://`` URL after the bucket."""

    url: str
    bucket: str
    prefix: str = ""

    @property
    def is_s3(self) -> bool:
        return self.url.startswith(S3_SCHEME)

    @property
    def kind(self) -> str:
        """Which reader reads its objects: ``s3`` or ``folder``."""
        return "s3" if self.is_s3 else "folder"

    @classmethod
    def from_url(cls, url: str) -> Source:
        """A source as a scan recorded it (an ``s3://`` URL or a folder's absolute path)."""
        if url.startswith(S3_SCHEME):
            bucket, _, prefix = url[len(S3_SCHEME) :].partition("/")
            return cls(url=url, bucket=bucket, prefix=prefix)
        return cls(url=url, bucket=url)


def parse_source(text: str) -> Source:
    """What a user typed: an ``s3://bucket/prefix`` URL, or a folder that must exist."""
    if text.startswith(S3_SCHEME):
        source = Source.from_url(text)
        if not source.bucket:
            raise ConfigurationError(f"{text!r} names no bucket; use s3://bucket/prefix/")
        return source
    folder = Path(text).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigurationError(f"{text} is not a folder (and not an s3:// URL)")
    return Source(url=str(folder), bucket=str(folder))


@dataclass(frozen=True)
class S3Location:
    """Where an image lives in S3, for recognizers that can read it there themselves."""

    bucket: str
    key: str
    size: int


class ObjectReader(Protocol):
    def read(self, bucket: str, key: str, etag: str | None = None) -> bytes:
        """The object's bytes; with ``etag``, only if it is still the version listed with it
        (else :class:`ObjectChangedError`)."""
        ...


class ObjectRanges(Protocol):
    """One object's bytes read a range at a time (a video: :class:`worker.media.video.ByteRanges`)."""

    size: int

    def read(self, start: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class FolderReader:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def ranges(self, bucket: str, key: str, etag: str | None = None, size: int | None = None) -> ObjectRanges:
        """The file, opened to be read a range at a time (a video), if it is the version listed
        (``size``: as listed; the file's own is read)."""
        path = _inside(bucket, key)
        with _file_errors(bucket, key):
            handle = path.open("rb")
            stat = os.fstat(handle.fileno())
        if etag is not None and file_etag(stat.st_size, stat.st_mtime_ns) != etag:
            handle.close()
            raise ObjectChangedError(f"{key} changed after it was listed (its size or time is not the one listed)")
        return _FileRanges(handle, stat.st_size)

    def read(self, bucket: str, key: str, etag: str | None = None) -> bytes:
        path = _inside(bucket, key)
        with _file_errors(bucket, key):
            stat = path.stat()
            if stat.st_size > self.max_bytes:
                raise ImageTooLargeError(f"the file is {stat.st_size:,} bytes; the limit is {self.max_bytes:,}")
            data = path.read_bytes()
            if etag is not None and file_etag(len(data), stat.st_mtime_ns) != etag:
                raise ObjectChangedError(f"{key} changed after it was listed (its size or time is not the one listed)")
            return data


def _inside(folder: str, key: str) -> Path:
    """The path of ``key`` in ``folder``, refused when it leads outside the folder."""
    root = Path(folder).resolve()
    path = root / key
    if not path.resolve().is_relative_to(root):
        raise AccessDeniedError(f"{key} leads outside the scanned folder {root}")
    return path


@contextmanager
def _file_errors(folder: str, key: str) -> Iterator[None]:
    """A file's errors as celebscan's: gone, not allowed, a directory now."""
    try:
        yield
    except FileNotFoundError as exc:
        raise ObjectMissingError(
            f"{key} is gone from {Path(folder).resolve()} (deleted or moved since listing)"
        ) from exc
    except PermissionError as exc:
        raise AccessDeniedError(f"no permission to read {key}: {exc.strerror}") from exc
    except IsADirectoryError as exc:
        raise ObjectMissingError(f"{key} is now a directory") from exc


class S3Reader:
    """Reads objects with GetObject; AWS errors become celebscan's typed errors.

    Takes a client, or settings to make one on the first read: a boto3 client costs ~0.35 s to
    build, which every worker process of a folder scan would otherwise pay for nothing. One client
    serves every thread of the process: the first reads of a run's calls in flight come together,
    and a client each (its service model loaded anew) cost 15 MB apiece (measured: 585 MB at 32).
    """

    def __init__(self, s3_client=None, max_bytes: int = 0, *, settings: Settings | None = None) -> None:
        self._client, self._settings = s3_client, settings
        self._building = threading.Lock()
        self.max_bytes = max_bytes

    @property
    def client(self):
        if self._client is None:
            with self._building:
                if self._client is None:
                    self._client = client("s3", self._settings)
        return self._client

    def read(self, bucket: str, key: str, etag: str | None = None) -> bytes:
        try:
            response = self.client.get_object(Bucket=bucket, Key=key, **({"IfMatch": f'"{etag}"'} if etag else {}))
            size = response["ContentLength"]
            if size > self.max_bytes:
                response["Body"].close()
                raise ImageTooLargeError(f"the object is {size:,} bytes; the limit is {self.max_bytes:,}")
            return response["Body"].read()
        except AWS_ERRORS as exc:
            raise translate(exc, f"reading s3://{bucket}/{key}") from exc

    def ranges(self, bucket: str, key: str, etag: str | None = None, size: int | None = None) -> ObjectRanges:
        """The object, to be read a range at a time (a video), each range only from the version
        listed with ``etag`` (``If-Match``); ``size`` as listed (else asked for)."""
        if size is None:
            try:
                head = self.client.head_object(Bucket=bucket, Key=key, **({"IfMatch": f'"{etag}"'} if etag else {}))
            except AWS_ERRORS as exc:
                raise translate(exc, f"reading s3://{bucket}/{key}") from exc
            size = int(head["ContentLength"])
        return _S3Ranges(self.client, bucket, key, etag, size)


class _FileRanges:
    def __init__(self, handle, size: int) -> None:
        self.handle, self.size = handle, size

    def read(self, start: int, length: int) -> bytes:
        self.handle.seek(start)
        return self.handle.read(length)

    def close(self) -> None:
        self.handle.close()


class _S3Ranges:
    def __init__(self, s3_client, bucket: str, key: str, etag: str | None, size: int) -> None:
        self.client, self.bucket, self.key, self.etag, self.size = s3_client, bucket, key, etag, size

    def read(self, start: int, length: int) -> bytes:
        end = min(start + length, self.size) - 1
        if end < start:
            return b""
        match = {"IfMatch": f'"{self.etag}"'} if self.etag else {}
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end}", **match)
            return response["Body"].read()
        except AWS_ERRORS as exc:
            raise translate(exc, f"reading s3://{self.bucket}/{self.key}") from exc

    def close(self) -> None:
        pass


def build_readers(settings: Settings) -> dict[str, ObjectReader]:
    """One reader per kind of source, keyed by :attr:`Source.kind`."""
    return {
        "folder": FolderReader(settings.max_image_bytes),
        "s3": S3Reader(max_bytes=settings.max_image_bytes, settings=settings),
    }
