"""Listing the images under a source.

An S3 prefix is listed with the ListObjectsV2 paginator, its key space first split by the keys'
characters into parts listed in parallel, so flat buckets and wide ones both list fast. A local
folder is walked recursively; each file's etag is its size and modification time (nothing is read
while listing), so a rescan skips unchanged files; the worker records each file's content hash.
Symlinks are never followed out of the folder.

It is in ``worker/`` because, with a broker, the workers list the parts of an S3 key space
(``worker/listing_parts.py``); the producer lists in-process without one.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from worker.aws import AWS_ERRORS, translate
from worker.errors import CelebscanError, ConfigurationError
from worker.media import is_media_name
from worker.retry import call_with_retry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListedObject:
    key: str
    etag: str
    size: int
    #: (code, message) for an entry that is listed but can never be read (a symlink loop, a name that
    #: is not UTF-8, an unreadable sub-folder): it is recorded ``failed`` at once, never handed out.
    error: tuple[str, str] | None = None


def list_folder(folder: Path, after: str | None = None) -> Iterator[ListedObject]:
    """Every image file under ``folder`` in walking order (a folder's files by name, then its
    sub-folders by name), with its size and modification time; with ``after``, only the entries
    that come after that key in this order (a listing resumed where it stopped; sub-folders wholly
    before it are not walked).

    A bad entry never stops the listing: a symlink loop, a dangling link, a name that is not valid
    UTF-8 or a sub-folder that cannot be read is yielded with its error (and logged in one line),
    so it is recorded ``failed`` and can be found with ``celebscan results``. Symlinks that lead
    outside the folder are skipped.
    """
    root = Path(folder).resolve()
    start = walking_order(after) if after is not None else None
    unreadable: list[OSError] = []

    def wanted(entry: ListedObject) -> bool:
        return start is None or walking_order(entry.key) > start

    for directory, subdirs, files in os.walk(root, onerror=unreadable.append):
        while unreadable:
            entry = _unreadable_folder(root, unreadable.pop())
            if wanted(entry):
                yield entry
        subdirs.sort()
        if start is not None:
            here = walking_order(Path(directory).relative_to(root).as_posix() + "/")[:-1]
            subdirs[:] = [d for d in subdirs if start[: len(here) + 1] <= (*here, (1, d))]
        for name in sorted(files):
            path = Path(directory, name)
            if is_media_name(name):
                listed = _listed_file(root, path)
                if listed is not None and wanted(listed):
                    yield listed
    while unreadable:
        entry = _unreadable_folder(root, unreadable.pop())
        if wanted(entry):
            yield entry


def walking_order(key: str) -> tuple[tuple[int, str], ...]:
    """Where ``key`` comes in :func:`list_folder`'s order: in each folder, files (0) by name before
    sub-folders (1) by name."""
    *folders, name = key.split("/")
    return (*((1, folder) for folder in folders if folder not in ("", ".")), (0, name))


def _listed_file(root: Path, path: Path) -> ListedObject | None:
    key = path.relative_to(root).as_posix()
    if not _is_utf8(key):
        printable = os.fsencode(key).decode("utf-8", "backslashreplace")
        return _bad_entry(printable, "InvalidFileName", "the file name is not valid UTF-8; rename the file")
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except FileNotFoundError:
            return _bad_entry(key, "BrokenSymlink", f"the symlink points to {os.readlink(path)}, which does not exist")
        except (RuntimeError, OSError) as exc:  # RuntimeError: Python < 3.13's "Symlink loop"
            return _bad_entry(key, "SymlinkLoop", f"the symlink cannot be followed: {exc}")
        if not target.is_relative_to(root):
            log.warning("skipping %s: a symlink that leads outside %s", path, root)
            return None
    try:
        stat = path.stat()
    except OSError as exc:
        log.warning("cannot read %s while listing: %s", path, exc)
        return ListedObject(key=key, etag="unreadable", size=0)
    return ListedObject(key=key, etag=file_etag(stat.st_size, stat.st_mtime_ns), size=stat.st_size)


def file_etag(size: int, mtime_ns: int) -> str:
    """A local file's version: its size and modification time mark a change, and reading nothing
    lists a folder fast (the worker hashes the content, which it reads anyway: ``content_hash``)."""
    return f"{size}-{mtime_ns}"


def _unreadable_folder(root: Path, exc: OSError) -> ListedObject:
    folder = Path(exc.filename or root)
    key = folder.relative_to(root).as_posix() + "/" if folder != root else "./"
    return _bad_entry(key, "UnreadableFolder", f"the folder cannot be listed: {exc.strerror or exc}")


def _bad_entry(key: str, code: str, message: str) -> ListedObject:
    log.warning("%s: %s (recorded as failed, %s)", key, message, code)
    return ListedObject(key=key, etag="unreadable", size=0, error=(code, message))


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes come back from os.walk as lone surrogates
        return False
    return True


def list_s3(
    s3_client, bucket: str, prefix: str = "", *, threads: int = 8, page_size: int = 1000, parts: int = 32
) -> Iterator[ListedObject]:
    """Every image object under ``s3://bucket/prefix``, its key space split into ``parts`` listed
    in parallel (see :func:`split_key_space`), flat buckets and folders alike.

    A listing error (no such bucket, access denied, unreachable endpoint) is a ``ConfigurationError``.
    """
    exact, prefixes = split_key_space(s3_client, bucket, prefix, parts, page_size)
    yield from exact
    paging = {"PageSize": page_size}
    if len(prefixes) == 1:
        for page in _pages(s3_client, Bucket=bucket, Prefix=prefixes[0], PaginationConfig=paging):
            yield from images_in(page)
    elif prefixes:
        yield from _list_in_parallel(s3_client, bucket, prefixes, threads, paging)


#: Sorts after every character a key can hold: ``StartAfter=p + c + PAST`` skips every key under ``p + c``.
PAST = "\U0010ffff"
#: A prefix with more populated next characters than this is listed whole rather than probed further.
MAX_CHILDREN = 64


def split_key_space(
    s3_client, bucket: str, prefix: str, parts: int, page_size: int = 1000
) -> tuple[list[ListedObject], list[str]]:
    """Split the keys under ``prefix`` into about ``parts`` disjoint prefixes, by their characters.

    The populated next characters of a prefix are found with one-key listings that start after
    each child in turn (``StartAfter=prefix + c + PAST``), so a child costs one request whatever its
    size. A prefix with one child is followed down (``img000`` of ``img000123.jpg``), so a flat
    bucket of numbered or hashed names splits as well as one with folders (a ``/`` is just another
    character). Returns the objects whose key is exactly a split prefix, and the prefixes to list.
    A prefix holding at most ``page_size`` keys is not split (it is one request to list).
    """
    exact: list[ListedObject] = []
    leaves: list[str] = []
    pending = [prefix]
    with ThreadPoolExecutor(max_workers=PROBE_THREADS) as pool:
        while pending and len(leaves) + len(pending) < parts:
            # A whole level at a time, so the parts stay alike in size (a part ten times the others
            # would be listed long after them); a level's prefixes are probed in parallel.
            frontier, pending = pending, []
            probes = pool.map(lambda current: _split(s3_client, bucket, current, exact, page_size), frontier)
            for current, children in zip(frontier, probes, strict=True):
                if children is None:
                    leaves.append(current)
                else:
                    pending += children
    return exact, leaves + pending


#: Prefixes probed at once while splitting a key space.
PROBE_THREADS = 8


def fits_in_a_page(s3_client, bucket: str, prefix: str, page_size: int = 1000) -> bool:
    """Whether one listing request returns every key under ``prefix``."""
    return not _list_once(s3_client, Bucket=bucket, Prefix=prefix, MaxKeys=page_size).get("IsTruncated")


def _list_once(s3_client, **arguments) -> dict:
    """One ListObjectsV2 request, tried again on throttling and 5xx (``CELEBSCAN_MAX_ATTEMPTS`` is
    the workers'; here a fixed few); an error that stays is a ``ConfigurationError``."""
    what = f"listing s3://{arguments['Bucket']}/{arguments.get('Prefix', '')}"

    def request() -> dict:
        try:
            return s3_client.list_objects_v2(**arguments)
        except AWS_ERRORS as exc:
            raise translate(exc, what) from exc

    try:
        return call_with_retry(request, attempts=LISTING_ATTEMPTS)
    except CelebscanError as exc:
        raise ConfigurationError(str(exc)) from exc


#: Tries of one listing request made while splitting a key space or checking a bucket.
LISTING_ATTEMPTS = 5


def _split(s3_client, bucket: str, prefix: str, exact: list[ListedObject], page_size: int) -> list[str] | None:
    """How to split ``prefix`` (see :func:`_children`); None, not split, when one page lists it."""
    if fits_in_a_page(s3_client, bucket, prefix, page_size):
        return None
    return _children(s3_client, bucket, prefix, exact)


def _children(s3_client, bucket: str, prefix: str, exact: list[ListedObject]) -> list[str] | None:
    """How to split ``prefix``: its keys' longer common prefix when they share one (found by a
    binary search, a request a step), else ``prefix`` + each populated next character; None when
    there are too many characters to probe."""

    def first_after(after: str | None) -> dict | None:
        arguments = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1}
        if after is not None:
            arguments["StartAfter"] = after
        contents = _list_once(s3_client, **arguments).get("Contents", [])
        return contents[0] if contents else None

    item = first_after(None)
    if item is not None and item["Key"] == prefix:  # an object named like the prefix: no next character
        exact.extend(images_in({"Contents": [item]}))
        item = first_after(prefix)
    if item is None:
        return []
    first = item["Key"]
    shortest, longest = len(prefix), len(first)  # every key under prefix starts with first[:shortest]
    while shortest < longest:
        middle = (shortest + longest + 1) // 2
        if first_after(first[:middle] + PAST) is None:
            shortest = middle
        else:
            longest = middle - 1
    if shortest > len(prefix):
        return [first[:shortest]]
    children = [first[: len(prefix) + 1]]
    while len(children) <= MAX_CHILDREN:
        item = first_after(children[-1] + PAST)
        if item is None:
            return children
        children.append(item["Key"][: len(prefix) + 1])
    return None


def check_bucket(s3_client, bucket: str, prefix: str = "") -> None:
    """Fail early, before a scan is created, when the bucket cannot be listed under ``prefix``.

    Listing under the prefix (not the whole bucket) keeps working for a role that may list only
    that prefix, as deploy/aws's worker role.
    """
    _list_once(s3_client, Bucket=bucket, Prefix=prefix, MaxKeys=1)


def _pages(s3_client, **arguments) -> Iterator[dict]:
    try:
        yield from s3_client.get_paginator("list_objects_v2").paginate(**arguments)
    except AWS_ERRORS as exc:
        raise ConfigurationError(
            str(translate(exc, f"listing s3://{arguments['Bucket']}/{arguments['Prefix']}"))
        ) from exc


def images_in(page: dict) -> Iterator[ListedObject]:
    for item in page.get("Contents", ()):
        key = item["Key"]
        if key.endswith("/") or not is_media_name(key):
            continue
        yield ListedObject(key=key, etag=item["ETag"].strip('"'), size=item["Size"])


_DONE = object()


def _list_in_parallel(
    s3_client, bucket: str, prefixes: list[str], threads: int, paging: dict
) -> Iterator[ListedObject]:
    """Stream the listings of several prefixes through a bounded queue (memory stays flat)."""
    pages: queue.Queue = queue.Queue(maxsize=4 * threads)
    stop = threading.Event()

    def list_prefix(prefix: str) -> None:
        try:
            for page in _pages(s3_client, Bucket=bucket, Prefix=prefix, PaginationConfig=paging):
                if stop.is_set():
                    return
                pages.put(list(images_in(page)))
        except BaseException as exc:
            pages.put(exc)
        finally:
            pages.put(_DONE)

    with ThreadPoolExecutor(max_workers=min(threads, len(prefixes))) as pool:
        for prefix in prefixes:
            pool.submit(list_prefix, prefix)
        remaining = len(prefixes)
        try:
            while remaining:
                item = pages.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield from item
        finally:
            stop.set()
            while remaining:  # unblock producers so the pool can shut down
                if pages.get() is _DONE:
                    remaining -= 1
