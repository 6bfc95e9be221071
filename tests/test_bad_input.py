"""The bad-input matrix, end to end: a bucket of awkward objects scanned by a real Celery worker.

Every object ends with one row: ``done`` for what can be read (after conversion where needed),
``failed`` with its documented code for what cannot; the worker keeps going.
"""

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from producer.cli import cli
from tests.celery_workers import celery_workers, wait_for_scan
from tests.imagemaker import encode, halves, jpeg, png_declaring
from tests.rekognition_standin import celebrity
from worker.store import ResultStore

pytestmark = pytest.mark.slow


def photo(width: int, height: int) -> Image.Image:
    """A photo-like picture: smooth gradients with mild noise (compresses like a real photo)."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8))


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(halves(300, 200).transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)


def palette_with_transparency() -> bytes:
    palette = halves(300, 200).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return encode(palette, "PNG", transparency=palette.getpixel((10, 10)))


def animated_gif() -> bytes:
    frames = [halves(300, 200), halves(300, 200).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def corrupt_jpeg() -> bytes:
    data = bytearray(jpeg(400, 300))
    data[300:-2] = b"\x00" * (len(data) - 302)
    return bytes(data)


LONG_KEY = "bad/" + "very-long-name-" * 60 + ".jpg"

# key -> (bytes, expected status, expected error code or None)
MATRIX = {
    "bad/corrupt.jpg": (corrupt_jpeg, "failed", "CorruptImage"),
    "bad/truncated.jpg": (lambda: jpeg(400, 300)[:1500], "failed", "CorruptImage"),
    "bad/truncated.png": (lambda: encode(halves(400, 300), "PNG")[:400], "failed", "CorruptImage"),
    "bad/empty.jpg": (lambda: b"", "failed", "EmptyObject"),
    "bad/text.jpg": (lambda: b"shopping list: eggs, milk\n" * 20, "failed", "InvalidImageFormat"),
    "bad/error-page.png": (lambda: b"<!DOCTYPE html><html><body>500</body></html>", "failed", "InvalidImageFormat"),
    "bad/bomb.png": (lambda: png_declaring(60000, 60000), "failed", "ImageTooLarge"),
    "bad/tiny.jpg": (lambda: jpeg(60, 60), "failed", "ImageTooSmall"),
    "bad/photo.heic": (lambda: b"\x00\x00\x00\x18ftypheic" + bytes(500), "failed", "InvalidImageFormat"),
    "bad/deleted.jpg": (lambda: jpeg(300, 200), "failed", "ObjectNotFound"),
    "bad/overwritten.jpg": (lambda: jpeg(310, 200), "failed", "ObjectChanged"),
    "ok/cmyk.jpg": (lambda: encode(halves(300, 200).convert("CMYK"), "JPEG"), "done", None),
    "ok/16bit.png": (lambda: encode(Image.fromarray(np.full((200, 300), 40000, np.uint16)), "PNG"), "done", None),
    "ok/palette-transparent.png": (palette_with_transparency, "done", None),
    "ok/animated.gif": (animated_gif, "done", None),
    "ok/picture.webp": (lambda: encode(halves(300, 200), "WEBP"), "done", None),
    "ok/scan.tiff": (lambda: encode(halves(300, 200), "TIFF"), "done", None),
    "ok/exif-rotated.jpg": (exif_rotated, "done", None),
    "ok/40-megapixel.jpg": (lambda: encode(photo(7360, 5440), "JPEG", quality=97), "done", None),
    "ok/ünïcödé 名前 + 100%.jpg": (lambda: jpeg(300, 200), "done", None),
    LONG_KEY: (lambda: jpeg(302, 200), "done", None),  # not the same picture as the one above
}


def test_every_bad_input_ends_failed_with_its_code_and_the_worker_goes_on(
    aws_env, rekognition, broker_url, postgres_url, s3, bucket, tmp_path
):
    from tests.conftest import _reset_postgres, rekognition_scan_env

    _reset_postgres(postgres_url)
    for key, (make, _, _) in MATRIX.items():
        s3.put_object(Bucket=bucket, Key=key, Body=make())
    sizes = []
    rekognition.answer = lambda key, data: (
        sizes.append(Image.open(io.BytesIO(data)).size) or {"CelebrityFaces": [celebrity("someone")]}
    )
    env = rekognition_scan_env(aws_env, rekognition, broker_url, postgres_url)
    result = CliRunner().invoke(cli, ["scan", f"s3://{bucket}/"], env=env, catch_exceptions=False)
    assert result.exit_code == 0 and f"listed {len(MATRIX)} images" in result.output, result.output
    s3.delete_object(Bucket=bucket, Key="bad/deleted.jpg")  # gone between listing and processing
    s3.put_object(Bucket=bucket, Key="bad/overwritten.jpg", Body=jpeg(320, 200))  # another version since

    store = ResultStore.connect(postgres_url)
    scan_id = store.latest_scan_id()
    with celery_workers(1, env, tmp_path):
        wait_for_scan(store, scan_id, timeout=300)

    records = {r.key: r for r in store.result_records(scan_id)}
    print()
    for key, (_, status, code) in MATRIX.items():
        record = records[key]
        got = (record.status, getattr(record.error, "code", None))
        print(f"{key[:40]:<40} {got[0]:<6} {got[1] or ''}")
        assert got == (status, code), (key, record.error)
    assert len(records) == len(MATRIX)
    ok = [k for k in MATRIX if k.startswith("ok/") or k == LONG_KEY]
    assert len([c for c in rekognition.calls if c.answered == "ok"]) == len(ok), "refused inputs are never sent"
    assert (300, 200) in sizes, "the EXIF-rotated photo is sent upright"
    assert records["ok/40-megapixel.jpg"].width == 7360
    shrunk = [(w, h) for w, h in sizes if w < 7360 and abs(w / h - 7360 / 5440) < 0.01]
    assert shrunk, "the 32 MB, 40-megapixel JPEG is shrunk and sent as bytes"
    assert all(c.size <= 5 * 1024 * 1024 for c in rekognition.calls if c.kind == "Bytes")
    store.engine.dispose()


def test_bad_folder_entries_are_recorded_failed_and_the_scan_goes_on(tmp_path, sqlite_url):
    """A symlink loop, a dangling link and a name that is not UTF-8 each end one failed row."""
    from tests.clirun import celebscan

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(jpeg(300, 200))
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / "dangling.jpg").symlink_to(folder / "deleted.jpg")
    os.close(os.open(os.fsencode(folder) + b"/caf\xe9.jpg", os.O_CREAT | os.O_WRONLY))
    result = celebscan("--database-url", sqlite_url, "scan", folder, "--workers", "1")
    assert "Traceback" not in result.output and "listed 4 images" in result.output, result.output
    records = {r.key: r for r in ResultStore.connect(sqlite_url).result_records()}
    got = {key: (r.status, getattr(r.error, "code", None)) for key, r in records.items()}
    assert got == {
        "good.jpg": ("done", None),
        "loop.jpg": ("failed", "SymlinkLoop"),
        "dangling.jpg": ("failed", "BrokenSymlink"),
        "caf\\xe9.jpg": ("failed", "InvalidFileName"),
    }
    assert "rename" in records["caf\\xe9.jpg"].error.message
    again = celebscan("--database-url", sqlite_url, "scan", folder, "--workers", "1")
    assert "3 failed" in again.output, "a rescan records the bad entries again, not a crash"


def list_as_unprivileged_user(folder: Path) -> list:
    """``list_folder(folder)`` in a forked child that drops root first (root reads every folder)."""
    from worker.listing import list_folder

    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            listed = [[o.key, o.error and o.error[0], o.error and o.error[1]] for o in list_folder(folder)]
            os.write(write_end, json.dumps(listed).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read()
    assert os.waitpid(child, 0)[1] == 0
    return json.loads(output)


def test_an_unreadable_sub_folder_is_recorded_and_the_listing_goes_on():
    base = Path(tempfile.mkdtemp(prefix="celebscan-unreadable-"))
    try:
        folder = base / "photos"
        (folder / "locked").mkdir(parents=True)
        (folder / "locked" / "hidden.jpg").write_bytes(jpeg())
        (folder / "open.jpg").write_bytes(jpeg())
        for path in (base, folder, folder / "open.jpg"):
            path.chmod(0o755)
        (folder / "locked").chmod(0o000)
        listed = list_as_unprivileged_user(folder)
        assert [entry[:2] for entry in listed] == [["open.jpg", None], ["locked/", "UnreadableFolder"]]
        assert listed[1][2].startswith("the folder cannot be listed: Permission denied")
    finally:
        (base / "photos" / "locked").chmod(0o755)
        shutil.rmtree(base)
