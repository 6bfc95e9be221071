"""Worker overhead per image with a zero-latency recognizer: read, decode, "recognize", write.

The real batch function (``worker.batch.process_batch``) runs in 2 processes over small JPEGs in a
local folder (each a distinct picture, so none is a copy of another), with a stub recognizer that
answers at once (one celebrity per image), writing to a real PostgreSQL server. Process start-up
is excluded. Target: ≥ 500 images/s on 2 cores.

    python -m bench.worker_overhead [--images 4000] [--processes 2] [--database postgresql|sqlite]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from tests.imagemaker import encode, halves
from tests.servers import postgres_server
from worker.batch import WorkerContext, process_batch
from worker.listing import list_folder
from worker.recognition import BoundingBox, Celebrity, RecognitionResult
from worker.recognizers import Recognizers
from worker.recognizers.stub import StubRecognizer
from worker.settings import Settings
from worker.sources import build_readers
from worker.store import ResultStore

TARGET = 500.0
ANSWER = RecognitionResult(celebrities=(Celebrity("someone", "1", 99.0, BoundingBox(0.1, 0.1, 0.2, 0.3)),))
_context: WorkerContext | None = None


def _init(database_url: str) -> None:
    global _context
    store = ResultStore.connect(database_url)
    _context = WorkerContext(
        store=store, readers=build_readers(Settings()), recognizers=Recognizers.of(StubRecognizer(lambda image: ANSWER))
    )


def _run(batch: list[int]) -> int:
    return process_batch(batch, _context).done


def _ready(_: int) -> bool:
    return _context is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    args = parser.parse_args()

    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="celebscan-overhead-")))
        folder = scratch / "photos"
        folder.mkdir()
        for i in range(args.images):
            picture = halves(320 + i % 7, 240)
            picture.putpixel((i % 300, i // 300 % 240), (255, i % 256, i // 256 % 256))  # each a distinct picture
            (folder / f"{i:06d}.jpg").write_bytes(encode(picture, "JPEG", quality=85))
        url = (
            stack.enter_context(postgres_server()) if args.database == "postgresql" else f"sqlite:///{scratch}/bench.db"
        )
        store = ResultStore.connect(url)
        scan_id = store.create_scan(str(folder), "stub")
        ids = store.queue_images(scan_id, str(folder), "stub", list_folder(folder)).image_ids
        size = Settings().batch_size
        batches = [ids[i : i + size] for i in range(0, len(ids), size)]

        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.processes, mp_context=spawn, initializer=_init, initargs=(url,)) as pool:
            assert all(pool.map(_ready, range(args.processes * 4)))
            started = time.perf_counter()
            done = sum(pool.map(_run, batches))
            elapsed = time.perf_counter() - started
        assert done == args.images, done
        summary = store.scan_summary(scan_id)
        assert summary.counts["done"] == args.images and summary.faces == args.images

    rate = args.images / elapsed
    print(f"{args.images} images, {args.processes} processes, {args.database}, batches of {Settings().batch_size}")
    print(
        f"worker overhead: {1000 * args.processes / rate:.2f} ms/image per process; {rate:,.0f} images/s "
        f"(target >= {TARGET:.0f}) {'OK' if rate >= TARGET else 'MISSED'}"
    )
    return 0 if rate >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
