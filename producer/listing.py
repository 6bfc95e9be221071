"""Listing the images under a source.

A local folder is walked recursively; each file's etag is the MD5 of its content (what S3 reports as
the ETag of an object uploaded in one part), so a rescan recognises unchanged files however they
were copied. Symlinks are never followed out of the folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from worker.errors import ConfigurationError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif"}
)


@dataclass(frozen=True)
class ListedObject:
    key: str
    etag: str
    size: int


@dataclass(frozen=True)
class Source:
    """Where a scan's images are: ``bucket`` is the S3 bucket or the folder's absolute path."""

    url: str
    bucket: str
    prefix: str = ""

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


def parse_source(text: str) -> Source:
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://"):].partition("/")
        if not bucket:
            raise ConfigurationError(f"{text!r} names no bucket; use s3://bucket/prefix/")
        return Source(url=text, bucket=bucket, prefix=prefix)
    folder = Path(text).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigurationError(f"{text} is not a folder (and not an s3:// URL)")
    return Source(url=str(folder), bucket=str(folder))


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def list_folder(folder: Path) -> Iterator[ListedObject]:
    """Every image file under ``folder``, in a stable order, with its content hash."""
    root = Path(folder).resolve()
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            path = Path(directory, name)
            if not is_image_name(name) or not _inside(path, root):
                continue
            try:
                yield ListedObject(key=path.relative_to(root).as_posix(), etag=_md5(path), size=path.stat().st_size)
            except OSError as exc:
                log.warning("cannot read %s while listing: %s", path, exc)
                yield ListedObject(key=path.relative_to(root).as_posix(), etag="unreadable", size=0)


def _inside(path: Path, root: Path) -> bool:
    if not path.is_symlink():
        return True
    inside = path.resolve().is_relative_to(root)
    if not inside:
        log.warning("skipping %s: a symlink that leads outside %s", path, root)
    return inside


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
