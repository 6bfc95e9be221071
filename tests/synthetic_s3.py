"""A fast S3 stand-in serving a synthetic bucket of any size, for scale tests and benchmarks.

moto lists a few thousand keys a second and takes hours to fill with millions of objects; this
server holds no objects at all. Object ``i`` of ``count`` is named by a formula that sorts like its
number, so any listing (prefix, delimiter, continuation token, start-after, max-keys) is computed
with a binary search, and every object's body is the same small JPEG. It speaks the parts of S3's
REST protocol that boto3 uses here: ListObjectsV2, GetObject and HeadObject (path-style URLs).

Run it as its own process (``python -m tests.synthetic_s3 --objects 1000000 --prefixes 100``), so a
benchmark measures celebscan and not the stand-in; ``SyntheticBucket`` is the in-process model.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape

from tests.imagemaker import jpeg, jpeg_with_comment

LAST_MODIFIED = "2025-01-01T00:00:00.000Z"
PAST = "\U0010ffff"  # sorts after every character a key holds


@dataclass
class SyntheticBucket:
    """``count`` objects; with ``prefixes`` > 0 they are spread over ``p000/`` ... folders, else flat."""

    name: str
    count: int
    prefixes: int = 0
    body: bytes = field(default_factory=lambda: jpeg(320, 240))
    #: Seconds each listing page takes (to act out a slow listing); 0: as fast as it goes.
    page_delay: float = 0.0

    def key(self, index: int) -> str:
        if not self.prefixes:
            return f"img{index:09d}.jpg"
        per_prefix = -(-self.count // self.prefixes)
        return f"p{index // per_prefix:03d}/img{index:09d}.jpg"

    def etag(self, index: int) -> str:
        return f"{index:032x}"  # not the MD5 of the body (as for SSE-KMS objects): cheap to list

    def size_of(self, index: int) -> int:
        return len(self.body) + 4 + len(self.key(index).encode())

    def body_of(self, index: int) -> bytes:
        """Object ``index``'s bytes: the same picture, a distinct file (a comment names its key)."""
        return jpeg_with_comment(self.body, self.key(index))

    def index_of(self, key: str) -> int:
        """The number of objects whose key sorts before ``key`` (a binary search over the formula)."""
        return bisect.bisect_left(range(self.count), key, key=self.key)

    def listing(self, prefix: str, delimiter: str, start: str, max_keys: int) -> tuple[list, list, str | None]:
        """(object indexes, common prefixes, next start key or None) of one page after ``start``."""
        position = max(self.index_of(prefix), self.index_of(start) if start else 0)
        if start and position < self.count and self.key(position) == start:
            position += 1
        objects: list[int] = []
        common: list[str] = []
        resume_after = start
        while position < self.count and len(objects) + len(common) < max_keys:
            key = self.key(position)
            if not key.startswith(prefix):
                break
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                common.append(key[: cut + len(delimiter)])
                resume_after = common[-1] + PAST  # the next page starts past every key under it
                position = self.index_of(resume_after)
            else:
                objects.append(position)
                resume_after = key
                position += 1
        more = position < self.count and self.key(position).startswith(prefix)
        return objects, common, resume_after if more else None

    def list_v2_xml(self, query: dict[str, str]) -> str:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        max_keys = min(int(query.get("max-keys", 1000)), 1000)
        start = unquote(query["continuation-token"]) if "continuation-token" in query else query.get("start-after", "")
        if self.page_delay:
            time.sleep(self.page_delay)  # the stand-in acting out a slow listing
        objects, common, next_start = self.listing(prefix, delimiter, start, max_keys)
        url = query.get("encoding-type") == "url"
        name = (lambda text: quote(text, safe="/")) if url else escape
        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
            f"<Name>{self.name}</Name><Prefix>{name(prefix)}</Prefix><KeyCount>{len(objects) + len(common)}</KeyCount>",
            f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{'true' if next_start else 'false'}</IsTruncated>",
        ]
        if delimiter:
            parts.append(f"<Delimiter>{name(delimiter)}</Delimiter>")
        if url:
            parts.append("<EncodingType>url</EncodingType>")
        if next_start:
            parts.append(f"<NextContinuationToken>{quote(next_start, safe='')}</NextContinuationToken>")
        parts += [
            f"<Contents><Key>{name(self.key(i))}</Key><LastModified>{LAST_MODIFIED}</LastModified>"
            f"<ETag>&quot;{self.etag(i)}&quot;</ETag><Size>{self.size_of(i)}</Size><StorageClass>STANDARD</StorageClass></Contents>"
            for i in objects
        ]
        parts += [f"<CommonPrefixes><Prefix>{name(p)}</Prefix></CommonPrefixes>" for p in common]
        parts.append("</ListBucketResult>")
        return "".join(parts)

    def find(self, key: str) -> int | None:
        index = self.index_of(key)
        return index if index < self.count and self.key(index) == key else None


def _handler(buckets: dict[str, SyntheticBucket], stats: dict[str, int]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: a million requests
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str) -> None:
            body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
            self._send(status, body, {"Content-Type": "application/xml"})

        def _route(self) -> None:
            url = urlsplit(self.path)
            name, _, key = url.path.lstrip("/").partition("/")
            bucket = buckets.get(name)
            if bucket is None:
                return self._error(404, "NoSuchBucket")
            if not key:
                query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                stats["list_requests"] += 1
                return self._send(200, bucket.list_v2_xml(query).encode(), {"Content-Type": "application/xml"})
            index = bucket.find(unquote(key))
            if index is None:
                return self._error(404, "NoSuchKey")
            stats["get_requests"] += 1
            headers = {
                "Content-Type": "image/jpeg",
                "ETag": f'"{bucket.etag(index)}"',
                "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT",
            }
            self._send(200, bucket.body_of(index), headers)

        do_GET = do_HEAD = _route

    return Handler


@contextlib.contextmanager
def serving(buckets: list[SyntheticBucket], host: str = "127.0.0.1") -> Iterator[tuple[str, dict[str, int]]]:
    """The stand-in in a thread of this process: (endpoint URL, request counts)."""
    stats = {"list_requests": 0, "get_requests": 0}
    server = ThreadingHTTPServer((host, 0), _handler({b.name: b for b in buckets}, stats))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}", stats
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def serving_in_a_process(bucket: str, objects: int, prefixes: int) -> Iterator[str]:
    """The stand-in as its own process (benchmarks: its work is not celebscan's); yields its URL."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.synthetic_s3",
            "--bucket",
            bucket,
            "--objects",
            str(objects),
            "--prefixes",
            str(prefixes),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        yield process.stdout.readline().strip()
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", default="big")
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--prefixes", type=int, default=100)
    args = parser.parse_args()
    with serving([SyntheticBucket(args.bucket, args.objects, args.prefixes)]) as (url, _):
        print(url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
