"""The command line, run in-process, against real folders, real photos and the real recognizer."""

import csv
import io
import json
import shutil

import pytest
from click.testing import CliRunner

from producer.cli import cli


def run(*args, env=None, ok=True):
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def records(database_url, *extra):
    return [json.loads(line) for line in run("--database-url", database_url, "results", *extra).stdout.splitlines()]


def all_commands(group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,), command
        if hasattr(command, "commands"):
            yield from all_commands(command, prefix + (name,))


@pytest.mark.parametrize("path", [p for p, _ in all_commands(cli)], ids=" ".join)
def test_every_command_has_help(path):
    result = run(*path, "--help")
    command = dict(all_commands(cli))[path]
    first_line = command.help.split("\n")[0] if command.help else ""
    assert first_line and " ".join(first_line.split()) in " ".join(result.output.split())


def test_options_name_their_environment_variables():
    assert "CELEBSCAN_WORKERS" in run("scan", "--help").output
    assert "CELEBSCAN_DATABASE_URL" in run("--help").output


@pytest.mark.slow
def test_faces_dev_scan_names_exactly_the_expected_people(faces_dev, expected_people, sqlite_url):
    run("--database-url", sqlite_url, "gallery", "import", str(faces_dev / "train"))
    for folder in ("test", "extra"):
        output = run("--database-url", sqlite_url, "scan", str(faces_dev / folder), "--workers", "2").output
        assert "0 failed" in output
    found = {}
    for record in records(sqlite_url):
        folder = "test" if record["source"].endswith("test") else "extra"
        found[f"{folder}/{record['key']}"] = record
    assert set(found) == set(expected_people)
    for image, people in expected_people.items():
        names = [c["name"] for c in found[image]["celebrities"]]
        assert sorted(names) == sorted(people), image
    stranger = found["extra/lin-manuel-miranda.png"]
    assert stranger["celebrities"] == [] and len(stranger["unrecognized_faces"]) == 1


@pytest.fixture
def photo_folder(tmp_path, faces_dev):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    # bytes, not shutil.copy: the shared photos are read-only, and a copy of their mode would be too
    (folder / "obama1.jpg").write_bytes((faces_dev / "test" / "obama1.jpg").read_bytes())
    (folder / "nested" / "alex.jpg").write_bytes((faces_dev / "test" / "alex_lacamoire1.jpg").read_bytes())
    (folder / "broken.png").write_bytes(b"<html>not found</html>")
    (folder / "readme.txt").write_text("not an image name, not listed")
    return folder


@pytest.fixture
def enrolled_url(sqlite_url, faces_dev):
    run("--database-url", sqlite_url, "gallery", "import", str(faces_dev / "train"))
    return sqlite_url


@pytest.mark.slow
def test_rescan_of_an_unchanged_folder_does_no_work_twice(enrolled_url, photo_folder):
    first = run("--database-url", enrolled_url, "scan", str(photo_folder), "--workers", "1").output
    assert "listed 3 images; 0 already done, 3 to scan" in first
    before = {r["key"]: r for r in records(enrolled_url)}
    assert before["nested/alex.jpg"]["celebrities"][0]["name"] == "alex_lacamoire"
    assert before["broken.png"]["error"]["code"] == "InvalidImageFormat"

    second = run("--database-url", enrolled_url, "scan", str(photo_folder)).output
    assert "2 already done, 1 to scan" in second  # the failed one is tried again, the done ones are not
    from sqlalchemy import create_engine, select

    from worker.schema import images

    with create_engine(enrolled_url).connect() as conn:
        attempts = dict(conn.execute(select(images.c.key, images.c.attempts)).all())
    assert attempts == {"obama1.jpg": 1, "nested/alex.jpg": 1, "broken.png": 1}

    shutil.copy(photo_folder / "nested" / "alex.jpg", photo_folder / "obama1.jpg")
    third = run("--database-url", enrolled_url, "scan", str(photo_folder)).output
    assert "listed 3 images; 1 already done, 2 to scan" in third
    latest = {r["key"]: r for r in records(enrolled_url)}
    assert latest["obama1.jpg"]["celebrities"][0]["name"] == "alex_lacamoire"


@pytest.mark.slow
def test_status_results_csv_and_output_file(enrolled_url, photo_folder, tmp_path):
    scan_output = run("--database-url", enrolled_url, "scan", str(photo_folder), "--workers", "1").output
    assert "people found: alex_lacamoire (1 image), obama (1 image)" in scan_output
    status = run("--database-url", enrolled_url, "status", "1").output
    assert "scan 1 (finished)" in status and "2 done, 1 failed" in status and "InvalidImageFormat 1" in status
    out = tmp_path / "results.csv"
    run("--database-url", enrolled_url, "results", "--scan", "1", "--format", "csv", "--output", str(out))
    rows = {row["key"]: row for row in csv.DictReader(io.StringIO(out.read_text()))}
    assert rows["obama1.jpg"]["people"] == "obama"
    assert rows["broken.png"]["error_code"] == "InvalidImageFormat"
    assert json.loads(rows["nested/alex.jpg"]["celebrities"])[0]["name"] == "alex_lacamoire"


def test_gallery_commands(sqlite_url, faces_dev):
    photo = str(faces_dev / "train" / "obama" / "obama.jpg")
    assert "enrolled: obama" in run("--database-url", sqlite_url, "gallery", "add", "obama", photo).output
    assert run("--database-url", sqlite_url, "gallery", "list").output == "obama\t1 photo\n"
    refused = run(
        "--database-url",
        sqlite_url,
        "gallery",
        "add",
        "crowd",
        str(faces_dev / "test" / "obama_and_biden.jpg"),
        ok=False,
    )
    assert refused.exit_code == 1 and "3 faces found" in refused.output
    run("--database-url", sqlite_url, "gallery", "remove", "obama")
    assert "empty" in run("--database-url", sqlite_url, "gallery", "list").output
    missing = run("--database-url", sqlite_url, "gallery", "remove", "obama", ok=False)
    assert missing.exit_code == 1 and "nobody called 'obama'" in missing.output


@pytest.mark.slow
def test_a_local_scan_re_embeds_what_an_older_face_model_embedded(sqlite_url, faces_dev, tmp_path):
    from sqlalchemy import create_engine, update

    from worker.faces.models import DLIB_RESNET_V1
    from worker.schema import gallery_faces

    run("--database-url", sqlite_url, "gallery", "add", "obama", str(faces_dev / "train" / "obama" / "obama.jpg"))
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:  # as an upgrade finds it: the photo embedded by dlib
        conn.execute(update(gallery_faces).values(model=DLIB_RESNET_V1.id, embedding=bytes(8 * 128)))
    engine.dispose()
    listed = run("--database-url", sqlite_url, "gallery", "list").output
    assert "1 photo embedded by an older face model: run `celebscan gallery reembed`" in listed
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(faces_dev / "test" / "obama1.jpg", folder)
    output = run("--database-url", sqlite_url, "scan", str(folder), "--workers", "1").output
    assert "re-embedding 1 gallery photo with the face model sface-2021dec-int8bq" in output
    assert [c["name"] for c in records(sqlite_url)[0]["celebrities"]] == ["obama"]
    again = run("--database-url", sqlite_url, "gallery", "reembed").output
    assert "every enrolled photo is embedded with the current face model" in again


def test_database_url_comes_from_the_environment(tmp_path, photo_folder):
    url = f"sqlite:///{tmp_path / 'from-env.db'}"
    run("scan", str(photo_folder), "--workers", "1", env={"CELEBSCAN_DATABASE_URL": url})
    assert len(records(url)) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (("scan", "/no/such/folder"), "is not a folder"),
        (("status", "42"), "no such scan"),
        (("results", "--scan", "42"), "there is no scan 42"),
        (("scan", ".", "--backend", "nonsense"), "Invalid value for '--backend'"),
    ],
)
def test_bad_arguments_exit_non_zero_with_a_message(sqlite_url, args, message):
    result = run("--database-url", sqlite_url, *args, ok=False)
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_unreachable_database_is_a_clean_error_with_the_password_masked():
    url = "postgresql+psycopg2://scanner:s3cret-pw@127.0.0.1:1/results"
    result = run("--database-url", url, "status", ok=False)
    assert result.exit_code == 1
    assert "cannot reach database" in result.output and "s3cret-pw" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_environment_value_is_a_clean_error():
    result = run("status", env={"CELEBSCAN_BATCH_SIZE": "many"}, ok=False)
    assert result.exit_code == 1 and "CELEBSCAN_BATCH_SIZE='many'" in result.output


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("CELEBSCAN_BATCH_SIZE", "0", "CELEBSCAN_BATCH_SIZE=0 is out of range: it must be at least 1"),
        ("CELEBSCAN_MAX_ATTEMPTS", "-1", "CELEBSCAN_MAX_ATTEMPTS=-1 is out of range"),
        ("CELEBSCAN_BACKEND", "rekogniton", "CELEBSCAN_BACKEND='rekogniton' is not one of: local, rekognition"),
        ("CELEBSCAN_REKOGNITION_TPS", "fast", "CELEBSCAN_REKOGNITION_TPS='fast' is not a valid float"),
        ("CELEBSCAN_RETRY_DEADLINE", "-5", "CELEBSCAN_RETRY_DEADLINE=-5 is out of range"),
    ],
)
def test_a_bad_setting_stops_a_scan_before_anything_is_written(tmp_path, name, value, message):
    """Checked where it is read: one line, exit 1, no database made, nothing queued or enqueued."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    database = tmp_path / "celebscan.db"
    env = {name: value, "CELEBSCAN_DATABASE_URL": f"sqlite:///{database}", "CELERY_BROKER_URL": "redis://127.0.0.1:9/0"}
    result = run("scan", str(tmp_path / "photos"), env=env, ok=False)
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not database.exists()


def test_a_bad_option_value_is_refused_like_a_bad_setting(tmp_path):
    from worker.errors import ConfigurationError
    from worker.settings import Settings, _convert

    with pytest.raises(ConfigurationError, match="CELEBSCAN_BATCH_SIZE=0 is out of range"):
        Settings().replace(batch_size=0)
    flag = next(f for f in __import__("dataclasses").fields(Settings) if f.type == "int")
    assert _convert(flag, "12") == 12


@pytest.mark.parametrize("text, value", [("false", False), ("0", False), ("no", False), ("True", True), ("on", True)])
def test_bool_settings_read_false_as_false(text, value):
    import dataclasses

    from worker.settings import _convert

    @dataclasses.dataclass
    class Flags:
        verbose: bool = dataclasses.field(default=False, metadata={"env": "CELEBSCAN_VERBOSE"})

    [flag] = dataclasses.fields(Flags)
    assert _convert(flag, text) is value


def test_the_producer_never_imports_the_face_models():
    import subprocess
    import sys

    check = (
        "import sys, producer.cli, producer.enqueue, producer.scan; "
        "loaded = [m for m in ('cv2', 'pillow_heif', 'worker.recognizers.local') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", check], check=True)


def test_python_dash_m_producer_cli_runs_every_command():
    """``python -m producer.cli`` (the benchmarks' and tests' way to start the CLI in a process of
    its own) has the commands producer.faces_cli adds, as the ``celebscan`` script does."""
    import subprocess
    import sys

    listed = subprocess.run([sys.executable, "-m", "producer.cli", "--help"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "find " in listed.stdout and "faces " in listed.stdout
