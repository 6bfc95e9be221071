"""Reading one object's bytes from where a scan's images live.

Listing belongs to the producer; the worker only reads what it is handed, by (bucket, key). For a
local folder the bucket is the folder's absolute path and the key is relative to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from worker.errors import AccessDeniedError, ImageTooLargeError, ObjectMissingError


class ObjectReader(Protocol):
    def read(self, bucket: str, key: str) -> bytes: ...


class FolderReader:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def read(self, bucket: str, key: str) -> bytes:
        root = Path(bucket).resolve()
        path = root / key
        if not path.resolve().is_relative_to(root):
            raise AccessDeniedError(f"{key} leads outside the scanned folder {root}")
        try:
            size = path.stat().st_size
            if size > self.max_bytes:
                raise ImageTooLargeError(f"the file is {size:,} bytes; the limit is {self.max_bytes:,}")
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ObjectMissingError(f"{key} is gone from {root} (deleted or moved since listing)") from exc
        except PermissionError as exc:
            raise AccessDeniedError(f"no permission to read {key}: {exc.strerror}") from exc
        except IsADirectoryError as exc:
            raise ObjectMissingError(f"{key} is now a directory") from exc
