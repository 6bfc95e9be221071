"""The ``celebscan`` command line: parse, call the library, turn its errors into clean messages."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import click
from tqdm import tqdm

from producer.cost import VideoEstimate, paid_cost, usd
from producer.export import WRITERS
from producer.metrics import FORMATS, publish_to_cloudwatch, take_reading
from producer.scan import ScanRequest, estimate_source, run_scan
from worker.database import aware_utc, utcnow
from worker.errors import CelebscanError, GalleryError, MissingDependencyError
from worker.faces.gallery import Gallery
from worker.queue.videos import OVER_BUDGET
from worker.read_models import ImageError, ResultRecord, ScanSummary
from worker.recognizers import BACKENDS, PAID_BACKENDS
from worker.settings import Settings, env_var
from worker.sources import build_readers, parse_source
from worker.store import ResultStore


@dataclass
class App:
    """What every command is handed: the settings, and the store built from them on first use."""

    settings: Settings

    @cached_property
    def store(self) -> ResultStore:
        return ResultStore.from_settings(self.settings)


class CelebscanGroup(click.Group):
    """Turns celebscan's own errors into a one-line message and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CelebscanError as exc:
            raise click.ClickException(str(exc)) from exc


def setting_option(*decls: str, setting: str, help: str, **kwargs):
    """A CLI option that overrides one field of :class:`Settings` (and names its variable in --help)."""
    return click.option(*decls, setting, default=None, help=f"{help} [env: {env_var(setting)}]", **kwargs)


@click.group(cls=CelebscanGroup)
@setting_option("--database-url", setting="database_url", help="Results database URL (default sqlite:///celebscan.db).")
@setting_option(
    "--endpoint-url", setting="endpoint_url", help="Endpoint URL for S3-compatible stores and AWS stand-ins."
)
@click.option("-v", "--verbose", count=True, help="Log more (-v: info, -vv: debug).")
@click.version_option(package_name="celebscan")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, endpoint_url: str | None, verbose: int) -> None:
    """Scan a folder or bucket of images for well-known people and keep every result in a database."""
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_env().replace(database_url=database_url, endpoint_url=endpoint_url)
    except CelebscanError as exc:
        raise click.ClickException(str(exc)) from exc
    ctx.obj = App(settings)


@cli.command()
@click.argument("source", required=False)
@setting_option("--backend", setting="backend", type=click.Choice(BACKENDS), help="Recognizer to use.")
@setting_option(
    "--workers", setting="workers", type=click.IntRange(min=0), help="Processes for an embedded scan (0: one per core)."
)
@setting_option("--batch-size", setting="batch_size", type=click.IntRange(min=1), help="Images per batch.")
@click.option(
    "--force",
    is_flag=True,
    help="Recognize every picture again, once (its copies reuse that), even when it is already done.",
)
@click.option(
    "--resume",
    "resume_id",
    type=int,
    metavar="SCAN_ID",
    help="Hand out again the images of SCAN_ID still queued (after an interruption without a broker, or "
    "--max-cost); with a broker the workers repair a scan by themselves.",
)
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0),
    metavar="USD",
    help="Send only as many images as this budget pays for (Rekognition's tiered price); the rest stay "
    "queued for --resume.",
)
@click.option(
    "--inventory",
    metavar="S3_URL",
    help="Read the objects from this S3 Inventory report (s3://.../manifest.json, CSV) instead of listing the "
    "bucket; SOURCE, if given, narrows it to a prefix of the inventoried bucket.",
)
@click.option(
    "--prefilter-faces",
    is_flag=True,
    help="rekognition: run the local face detector first; images with no face are recorded with no "
    "faces and never sent (never billed). Needs the local extra on the workers.",
)
@click.pass_obj
def scan(
    app: App,
    source: str | None,
    backend: str | None,
    workers: int | None,
    batch_size: int | None,
    force: bool,
    resume_id: int | None,
    max_cost: float | None,
    prefilter_faces: bool,
    inventory: str | None,
) -> None:
    """Scan SOURCE (a folder, or s3://bucket/prefix/) and store who is in each image.

    With CELERY_BROKER_URL set, Celery workers do the work (and list a bucket's key space, which
    this command splits for them) while this command returns; otherwise it runs here, in a pool
    of local processes.
    """
    if (source is None and inventory is None) == (resume_id is None):
        raise click.UsageError("give either SOURCE (or --inventory) or --resume SCAN_ID")
    settings = app.settings.replace(backend=backend, workers=workers, batch_size=batch_size)
    if prefilter_faces and settings.backend not in PAID_BACKENDS:
        raise click.UsageError("--prefilter-faces saves paid calls: use it with --backend rekognition")
    if prefilter_faces and settings.embedded:
        from worker.faces.detection import FaceDetector

        FaceDetector.check_installed()
    if settings.backend == "local" and resume_id is None:
        _reembed_stale_gallery(app, settings)
    with _interrupted_by_sigterm(settings.embedded):
        summary = run_scan(
            app.store,
            settings,
            ScanRequest(
                source, resume_id, force=force, max_cost=max_cost, prefilter_faces=prefilter_faces, inventory=inventory
            ),
            say=click.echo,
        )
    if settings.embedded:
        click.echo(format_summary(summary, settings))
    elif settings.cloudwatch_namespace:
        _publish_backlog(app, settings)


@contextmanager
def _interrupted_by_sigterm(embedded: bool) -> Iterator[None]:
    """A ``kill`` ends an embedded scan as Ctrl-C does: its claims given back at once and the pool's
    processes stopped after the batch in hand (by default the command would die alone, and the
    pool go on draining with nobody watching and the command's batch held until its lease ran out)."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if not embedded or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@cli.command()
@click.argument("scan_id", type=int, required=False)
@click.option("--watch", is_flag=True, help="Follow the scan with a progress bar until it finishes.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between looks at the database with --watch.",
)
@click.pass_obj
def status(app: App, scan_id: int | None, watch: bool, interval: float) -> None:
    """Progress of a scan (the latest when SCAN_ID is not given): counts by status, rate, ETA."""
    summary = _summary(app.store, scan_id)
    if watch and not summary.finished_at:
        summary = _watch(app.store, summary, interval)
    click.echo(format_summary(summary, app.settings))


@cli.command()
@click.argument("source", required=False)
@click.option(
    "--queue",
    "queue_url",
    metavar="SQS_URL",
    help=f"The SQS queue the bucket sends its S3 Event Notifications to [env: {env_var('events_queue_url')}]",
)
@click.option(
    "--setup",
    is_flag=True,
    help="Set the queue up instead (with its dead-letter queue, a policy for this bucket only, and the bucket's "
    "notification configuration, keeping the others), print its URL and exit.",
)
@click.option("--queue-name", metavar="NAME", help="--setup: the queue's name (default celebscan-BUCKET-events).")
@setting_option("--backend", setting="backend", type=click.Choice(BACKENDS), help="Recognizer to use.")
@setting_option(
    "--workers", setting="workers", type=click.IntRange(min=0), help="Without a broker: local processes (0: per core)."
)
@click.option(
    "--receivers", type=click.IntRange(min=1, max=64), default=4, show_default=True, help="Receives in flight at once."
)
@click.option(
    "--wait-seconds",
    type=click.IntRange(min=1, max=20),
    default=20,
    show_default=True,
    help="Long polling: how long a receive waits for a message (a stop waits for the receive in hand).",
)
@click.pass_obj
def follow(
    app: App,
    source: str | None,
    queue_url: str | None,
    setup: bool,
    queue_name: str | None,
    backend: str | None,
    workers: int | None,
    receivers: int,
    wait_seconds: int,
) -> None:
    """Keep the results of SOURCE (s3://bucket/prefix/) current as pictures arrive and leave.

    Reads the bucket's S3 Event Notifications from an SQS queue: a new or overwritten image is
    queued in the source's standing scan (the workers recognize it as in any scan), a deleted one
    is left out of people, results and report (unless --include-deleted). Runs until SIGTERM or
    Ctrl-C, which let the receives in hand finish. Set the queue up once with --setup.
    """
    import signal
    import threading

    from producer.follow import default_queue_name, run_follow, set_up

    settings = app.settings.replace(backend=backend or app.settings.follow_backend or None, workers=workers)
    followed = parse_source(source or settings.follow_source or _missing("SOURCE", "follow_source"))
    if not followed.is_s3:
        raise click.UsageError("follow reads a bucket's events: give s3://bucket/prefix/")
    if setup:
        made = set_up(settings, followed, queue_name or default_queue_name(followed))
        click.echo(f"queue: {made.url}")
        click.echo(f"dead-letter queue: {made.dead_letter_arn}")
        click.echo(f"{followed.url} sends its new and deleted objects' events there; now run:")
        click.echo(f"  celebscan follow {followed.url} --queue {made.url} --backend {settings.backend}")
        return
    url = queue_url or settings.events_queue_url or _missing("--queue", "events_queue_url")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    counts = run_follow(
        app.store, settings, followed, url, stop, click.echo, receivers=receivers, wait_seconds=wait_seconds
    )
    click.echo(
        f"stopped: {counts.messages} messages, {counts.events} events applied ({counts.queued} queued, "
        f"{counts.skipped} done before, {_plural(counts.deleted, 'image')} marked deleted, "
        f"{counts.stale} out of date), "
        f"{counts.ignored} ignored, {counts.malformed} unreadable (left to the dead-letter queue)"
        + (f", {counts.left} left to come back (S3 could not say which version is current)" if counts.left else "")
    )


def _missing(what: str, setting: str):
    raise click.UsageError(f"give {what} or set {env_var(setting)}")


@cli.command("video-jobs")
@click.option(
    "--setup",
    is_flag=True,
    help="Set up where Rekognition Video announces its finished jobs (an SNS topic, an SQS queue subscribed to it, "
    "the IAM role it publishes with), print the settings the workers need, and exit.",
)
@click.option("--name", default="celebscan-video-jobs", show_default=True, help="--setup: the queue's name.")
@click.pass_obj
def video_jobs(app: App, setup: bool, name: str) -> None:
    """Rekognition Video's jobs: how many run now, fleet-wide, against the account's quota.

    Without --setup's notifications each video polls its job, with a wait that grows with the
    job's age; with them, a job's end makes its videos due within a second or two.
    """
    settings = app.settings
    if setup:
        from producer.video_notifications import set_up

        made = set_up(settings, name)
        click.echo(f"topic: {made.topic_arn}\nqueue: {made.queue_url}\nrole: {made.role_arn}")
        click.echo("set these where the workers run (and restart them):")
        click.echo(f"  {env_var('video_sns_topic_arn')}={made.topic_arn}")
        click.echo(f"  {env_var('video_sns_role_arn')}={made.role_arn}")
        click.echo(f"  {env_var('video_completions_queue_url')}={made.queue_url}")
        return
    from worker.queue.videos import VideoJobs

    figures = VideoJobs(app.store.engine).figures()
    click.echo(
        f"Rekognition Video jobs running: {figures.running} of {settings.rekognition_video_jobs} at once "
        f"({env_var('rekognition_video_jobs')})"
    )
    if settings.video_completions_queue_url:
        click.echo(f"their ends are read from {settings.video_completions_queue_url}")
    else:
        click.echo(
            f"their ends are polled: from {settings.video_poll_seconds:g} s, growing to "
            f"{settings.video_poll_max_seconds:g} s; `celebscan video-jobs --setup` sets up notifications"
        )


@cli.command()
@click.argument("source")
@click.pass_obj
def estimate(app: App, source: str) -> None:
    """Images, videos, bytes and the estimated Rekognition cost of scanning SOURCE, without calling it.

    A video's length is read from its container's header (never decoded), and priced per minute.

    Also how long the calls take at the account's Rekognition quota, and the workers that keep
    that pace (their number from the time per image measured in earlier scans, and their cost).
    """
    settings = app.settings
    found = estimate_source(app.store, parse_source(source), settings)
    cost = paid_cost(settings, found.billable)
    click.echo(f"{source}: {found.listed} images, {found.total_bytes / 1e6:,.1f} MB")
    click.echo(f"  already done with rekognition (skipped): {found.already_done}")
    click.echo(
        f"  to scan: {found.to_scan}; over the service's limits: {found.converted} to be converted "
        f"(shrunk and re-encoded before the call), {found.refused} to be refused "
        f"(larger than {env_var('max_image_bytes')}={settings.max_image_bytes:,} bytes)"
    )
    start = settings.rekognition_billed_this_month
    tiers = f" after {start:,} images billed this month" if start else ""
    if found.copies:
        click.echo(
            f"  distinct pictures: {found.distinct} ({found.copies} copies of a picture listed before or "
            f"already recognized cost no call: {usd(paid_cost(settings, found.copies))} saved)"
        )
    click.echo(
        f"  estimated Rekognition cost: {usd(cost)} for {found.billable} calls at most{tiers} "
        f"(prices: {env_var('rekognition_prices')}={settings.rekognition_prices}); "
        f"--prefilter-faces sends only images with a face"
    )
    if found.videos.listed:
        for line in _video_estimate_lines(found.videos, settings, cost):
            click.echo(line)
    for line in _pace_lines(app.store, settings, found.billable):
        click.echo(line)


def _video_estimate_lines(videos: VideoEstimate, settings: Settings, images_cost: float) -> list[str]:
    """What ``estimate`` says of a source's videos: read from their headers, priced per minute."""
    unknown = f" ({videos.unknown_length} of unknown length, counted as 0)" if videos.unknown_length else ""
    lines = [
        f"  videos: {videos.listed} ({videos.total_bytes / 1e6:,.1f} MB, {videos.probed_ms / 60_000:,.1f} minutes "
        f"read from their headers): {videos.already_done} already done, "
        f"{videos.copies} copies of a video listed before or already recognized (free), "
        f"{videos.billable} to send: {videos.minutes:,.1f} minutes{unknown}"
    ]
    if videos.over_limits:
        lines.append(
            "  videos over Rekognition Video's limits (failed before any call): "
            + ", ".join(f"{code} {n}" for code, n in sorted(videos.over_limits.items()))
        )
    if videos.unreadable:
        lines.append(
            "  videos that cannot be read: " + ", ".join(f"{code} {n}" for code, n in sorted(videos.unreadable.items()))
        )
    video_cost = videos.cost(settings.rekognition_video_price)
    lines.append(
        f"  estimated Rekognition Video cost: {usd(video_cost)} for {videos.minutes:,.1f} minutes at "
        f"${settings.rekognition_video_price:g}/min ({env_var('rekognition_video_price')}); "
        f"with the images: {usd(images_cost + video_cost)}"
    )
    return lines


def _pace_lines(store: ResultStore, settings: Settings, calls: int) -> list[str]:
    """How long ``calls`` take at the Rekognition quota, and the fleet that keeps that pace."""
    from producer.pace import Pace, duration, rekognition_quota

    quota = rekognition_quota(settings)
    if quota is None:
        return [
            f"  time: unknown: Service Quotas could not be read here; set {env_var('rekognition_tps')} to your "
            f"account's RecognizeCelebrities quota (calls per second)"
        ]
    pace = Pace(
        calls,
        quota,
        store.seconds_per_image("rekognition"),
        settings.worker_concurrency,
        settings.worker_hourly_price,
        settings.calls_in_flight,
    )
    lines = [
        f"  time at the quota: {calls:,} calls at {quota.calls_per_second:g} calls/s ({quota.source}) take "
        f"{duration(pace.seconds)}; Service Quotas can raise it"
    ]
    if pace.processes is None or pace.machines is None or pace.machine_cost is None:
        lines.append(
            "  workers: the time a worker spends per image is not measured yet (no image recognized with "
            "rekognition in this database): scan a sample first, then estimate again"
        )
    else:
        lines.append(
            f"  workers to keep that pace: {_plural(pace.processes, 'process', 'processes')} "
            f"({pace.seconds_per_image:.2f} s per image, measured; {settings.calls_in_flight} calls in flight "
            f"each, {env_var('calls_in_flight')}) = "
            f"{_plural(pace.machines, 'machine')} of {settings.worker_concurrency} "
            f"({env_var('worker_concurrency')}), {usd(pace.machine_cost)} for that time at "
            f"${settings.worker_hourly_price:g} per machine-hour ({env_var('worker_hourly_price')})"
        )
    return lines


def _watch(store: ResultStore, summary: ScanSummary, interval: float) -> ScanSummary:
    total = summary.processed + summary.counts["queued"]
    with tqdm(total=total, initial=summary.processed, unit="img", desc=f"scan {summary.id}", file=sys.stderr) as bar:
        while not summary.finished_at:
            time.sleep(interval)
            summary = store.summary(summary.id)
            bar.update(summary.processed - bar.n)
            if summary.failures:
                codes = ", ".join(f"{code} {n}" for code, n in sorted(summary.failures.items()))
                bar.set_postfix_str(f"failed: {codes}", refresh=False)
    return summary


def _publish_backlog(app: App, settings: Settings) -> None:
    """Tell the autoscaler about the new backlog at once (it may have no worker to tell it)."""
    try:
        namespace = publish_to_cloudwatch(take_reading(app.store, settings), settings)
    except CelebscanError as exc:
        click.echo(f"warning: the scan is enqueued, but its backlog was not published: {exc}", err=True)
    else:
        click.echo(f"published the backlog to CloudWatch namespace {namespace}")


@cli.command()
@click.option("--format", "fmt", type=click.Choice(sorted(FORMATS)), default="text", show_default=True)
@click.option(
    "--cloudwatch",
    is_flag=True,
    help=f"Also publish PendingImages, BacklogImages, BacklogPerWorker, QueueLength (batches), "
    f"WorkersOnline and, when following a bucket, EventsWaiting and EventLagSeconds to CloudWatch "
    f"[namespace: {env_var('cloudwatch_namespace')}, default Celebscan].",
)
@click.option(
    "--every",
    type=click.FloatRange(min=1),
    metavar="SECONDS",
    help="Take a reading every SECONDS until interrupted (a sidecar for an autoscaler).",
)
@click.pass_obj
def metrics(app: App, fmt: str, cloudwatch: bool, every: float | None) -> None:
    """Work left: queued images per unfinished scan, batches in the broker, workers online.

    With --format prometheus the output suits node_exporter's textfile collector; the scaling
    signal is BacklogPerWorker (queued images that workers can still receive, per online worker).
    """
    while True:
        reading = take_reading(app.store, app.settings)
        click.echo(FORMATS[fmt](reading))
        if cloudwatch:
            namespace = publish_to_cloudwatch(reading, app.settings)
            click.echo(f"published to CloudWatch namespace {namespace}", err=True)
        if every is None:
            return
        time.sleep(max(0.0, reading.taken_at + every - time.time()))


INCLUDE_DELETED_OPTION = click.option(
    "--include-deleted",
    is_flag=True,
    help="Also images whose object a followed bucket deleted (celebscan follow); left out by default.",
)

PERSON_OPTION = click.option(
    "--person",
    "persons",
    multiple=True,
    metavar="NAME",
    help="Only images in which this person was found: a name or a Rekognition id (repeatable).",
)


@cli.command()
@click.option("--scan", "scan_id", type=int, help="Only this scan's images (default: every image's latest result).")
@PERSON_OPTION
@click.option("--format", "fmt", type=click.Choice(sorted(WRITERS)), default="jsonl", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, writable=True), help="Write to FILE instead of stdout.")
@INCLUDE_DELETED_OPTION
@click.pass_obj
def results(
    app: App, scan_id: int | None, persons: tuple[str, ...], fmt: str, output: str | None, include_deleted: bool
) -> None:
    """One record per image: who is in it, or why it could not be read."""
    if scan_id is not None and app.store.scan_summary(scan_id) is None:
        raise click.ClickException(f"there is no scan {scan_id}")
    records = app.store.result_records(scan_id, persons=persons, include_deleted=include_deleted)
    if output:
        with open(output, "w", encoding="utf-8", newline="") as handle:
            count = WRITERS[fmt](records, handle)
        click.echo(f"wrote {count} records to {output}", err=True)
    else:
        WRITERS[fmt](records, sys.stdout)


@cli.group(cls=CelebscanGroup, invoke_without_command=True)
@click.option("--scan", "scan_id", type=int, help="Only the people of this scan (default: of every result kept).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N people.")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text", show_default=True)
@click.option("--unknown", is_flag=True, help="The unnamed people instead: groups of unrecognized faces alike.")
@INCLUDE_DELETED_OPTION
@click.pass_context
def people(
    ctx: click.Context, scan_id: int | None, limit: int | None, fmt: str, unknown: bool, include_deleted: bool
) -> None:
    """Everyone found, with the number of images (and videos) each is in, most first.

    Two people with one name (Rekognition ids differ) are two lines, each with its id.
    """
    if ctx.invoked_subcommand is not None:
        return
    app: App = ctx.obj
    if unknown:
        from producer.faces_cli import list_unknown

        list_unknown(app, limit, fmt)
        return
    if scan_id is not None and app.store.scan_summary(scan_id) is None:
        raise click.ClickException(f"there is no scan {scan_id}")
    found = app.store.people(scan_id, limit, include_deleted)
    if fmt == "jsonl":
        for person in found:
            click.echo(
                json.dumps(
                    {"name": person.name, "id": person.person_id, "images": person.images, "videos": person.videos}
                )
            )
        return
    if not found:
        click.echo("nobody found yet")
        return
    width = max(len(f"{person.images:,}") for person in found)
    in_videos = max(len(f"{person.videos:,}") for person in found) if any(p.videos for p in found) else 0
    shared = {name for name, count in Counter(person.name for person in found).items() if count > 1}
    for person in found:
        known_as = f"  (id {person.person_id})" if person.name in shared else ""
        counts = f"{person.images:>{width},}"
        if in_videos:  # pictures and videos side by side
            counts = f"{person.images:>{width},} {'image ' if person.images == 1 else 'images'}  "
            counts += f"{person.videos:>{in_videos},} {'video ' if person.videos == 1 else 'videos'}"
        click.echo(f"{counts}  {person.name}{known_as}")


@cli.command()
@click.option("--scan", "scan_id", type=int, help="The scan to show (default: the latest).")
@PERSON_OPTION
@click.option(
    "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path), default="report.html", show_default=True
)
@setting_option(
    "--per-person",
    setting="report_per_person",
    type=click.IntRange(min=1),
    help="Pictures shown of each person (and of images in which nobody was recognized).",
)
@INCLUDE_DELETED_OPTION
@click.option("--find", "find_photo", help="Also show the pictures with the face in this photo (as `find`).")
@click.option("--face", "face_number", type=click.IntRange(min=1), help="With --find: which face of the photo.")
@click.pass_obj
def report(
    app: App,
    scan_id: int | None,
    persons: tuple[str, ...],
    output: Path,
    report_per_person: int | None,
    include_deleted: bool,
    find_photo: str | None,
    face_number: int | None,
) -> None:
    """One self-contained HTML page: the people found with their counts and a few annotated pictures
    of each, the unnamed people (as last grouped) with a few faces each, the failures, a filter by person."""
    import dataclasses

    from producer.html_report import gather, render

    settings = app.settings.replace(report_per_person=report_per_person)
    summary = _summary(app.store, scan_id)
    content = gather(app.store, summary, settings.report_per_person, persons, include_deleted)
    if find_photo:
        from producer.faces_cli import sightings_of

        sightings = sightings_of(app, find_photo, face_number, settings.report_per_person)
        found = [record for s in sightings for record in app.store.result_records(key=s.key, limit=1)]
        heading = f"Pictures with the face of {Path(find_photo).name}: {len(sightings)} nearest shown"
        content = dataclasses.replace(content, found_heading=heading, found=found)
    if persons and not content.people:
        raise click.ClickException(f"nobody called {' or '.join(persons)} was found in scan {summary.id}")
    readers = build_readers(settings)
    with tqdm(total=len(content.pictures), unit="img", desc="report", disable=None, file=sys.stderr) as bar:
        page = render(content, readers, progress=bar.update)
    output.write_text(page, encoding="utf-8")
    click.echo(
        f"wrote {output} ({len(page.encode()) / 1e6:.1f} MB) for scan {summary.id}: "
        f"{_plural(len(content.people), 'person', 'people')}, {_plural(len(content.pictures), 'picture')}"
    )


@cli.command()
@click.argument("key")
@click.option("--scan", "scan_id", type=int, help="The image as scanned by this scan (default: its latest result).")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    required=True,
    help="Where to write the picture (.jpg or .png).",
)
@click.pass_obj
def show(app: App, key: str, scan_id: int | None, output: Path) -> None:
    """Draw the faces found in the image KEY (boxes, names and confidence) into one picture; for a
    video, its frame in which the person seen longest matched best."""
    from producer.html_report import annotated

    record = next(iter(app.store.result_records(scan_id, key=key)), None)
    if record is None:
        raise click.ClickException(f"no image {key!r}" + (f" in scan {scan_id}" if scan_id is not None else ""))
    if record.status != "done":
        error = record.error or ImageError(record.status, "not processed yet")
        raise click.ClickException(f"{key} has no result to draw: {error.code}: {error.message}")
    picture = annotated(record, build_readers(app.settings))
    picture.save(output)
    names = ", ".join(f"{c.name} ({c.match_confidence:.0f})" for c in record.celebrities) or "nobody"
    click.echo(f"wrote {output}: {names}; {_plural(len(record.unrecognized_faces), 'unrecognized face')}")


@cli.group(cls=CelebscanGroup)
def gallery() -> None:
    """The people the local recognizer knows."""


@gallery.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.pass_obj
def gallery_import(app: App, folder: Path) -> None:
    """Enroll FOLDER/<person name>/<photos> for every person folder."""
    enrollments = Gallery(app.store.engine).import_folder(folder, _embedder(app.settings))
    _report_enrollments(enrollments)
    _label_stored_faces(app, enrollments)


@gallery.command("add")
@click.argument("name")
@click.argument("photos", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def gallery_add(app: App, name: str, photos: tuple[Path, ...]) -> None:
    """Enroll PHOTOS of the person NAME (each must show exactly one face)."""
    pairs = ((str(path), path.read_bytes()) for path in photos)
    enrollments = Gallery(app.store.engine).enroll(name, pairs, _embedder(app.settings))
    _report_enrollments(enrollments)
    _label_stored_faces(app, enrollments)


@gallery.command("list")
@click.pass_obj
def gallery_list(app: App) -> None:
    """Enrolled people and how many photos each."""
    people = Gallery(app.store.engine).people()
    if not people:
        click.echo("the gallery is empty; enroll people with `celebscan gallery import DIR`")
    for name, photos in people:
        click.echo(f"{name}\t{photos} photo{'s' if photos != 1 else ''}")
    stale = Gallery(app.store.engine).stale()
    if stale:
        click.echo(f"{_plural(stale, 'photo')} embedded by an older face model: run `celebscan gallery reembed`")


@gallery.command("reembed")
@click.pass_obj
def gallery_reembed(app: App) -> None:
    """Embed again, with the current face model, the photos an older model embedded.

    From each photo's kept face crop, or from the photo where it was enrolled from; `celebscan scan`
    does this by itself when it finds such photos. Photos it cannot re-embed are named, with the
    command that enrolls them again.
    """
    results = Gallery(app.store.engine).reembed(_embedder(app.settings))
    if not results:
        click.echo("every enrolled photo is embedded with the current face model")
    _print_enrollments(results)
    _label_stored_faces(app, results)
    refused = sum(item.status == "refused" for item in results)
    if refused:
        raise GalleryError(f"{_plural(refused, 'photo')} could not be re-embedded and are not matched")


@gallery.command("remove")
@click.argument("name")
@click.pass_obj
def gallery_remove(app: App, name: str) -> None:
    """Forget the person NAME and their photos; the stored faces the gallery had named NAME are
    matched again (another enrolled person, or nobody)."""
    Gallery(app.store.engine).remove(name)
    click.echo(f"removed {name}")
    from worker.faces.labelling import Labeller

    labelled = Labeller(app.store.engine, app.settings).after_removing(name)
    click.echo(f"stored faces matched again: {labelled.looked_at:,}; names changed: {labelled.changed:,}")


@cli.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the sample images and the demo database here (default: a temporary folder).",
)
@setting_option("--workers", setting="workers", type=click.IntRange(min=0), help="Processes (0: one per core).")
@click.pass_obj
def demo(app: App, workdir: Path | None, workers: int | None) -> None:
    """Scan sample images with the local recognizer and print who was found.

    Uses its own database in the work folder, never the one in --database-url.
    """
    from producer.demo import build_demo_set

    with tempfile.TemporaryDirectory(prefix="celebscan-demo-") as scratch:
        folder = (workdir or Path(scratch)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        database = folder / "demo.db"
        database.unlink(missing_ok=True)
        settings = app.settings.replace(database_url=f"sqlite:///{database}", backend="local", workers=workers)
        demo_app = App(settings)
        sample = build_demo_set(folder)
        click.echo(f"enrolling one photo each of 2 people from {sample.gallery}")
        _report_enrollments(Gallery(demo_app.store.engine).import_folder(sample.gallery, _embedder(settings)))
        embedded = settings.replace(broker_url="")
        summary = run_scan(demo_app.store, embedded, ScanRequest(str(sample.images)), say=click.echo)
        click.echo(format_summary(summary, embedded))
        click.echo("")
        mismatches = _print_demo_table(demo_app.store.result_records(summary.id), sample.expected)
        if workdir:
            click.echo(f"\nsee everything: celebscan --database-url sqlite:///{database} results")
    if mismatches:
        raise click.ClickException(f"{mismatches} image(s) not as expected: the installation is not working right")


def _print_demo_table(records: Iterable[ResultRecord], expected: dict[str, frozenset[str]]) -> int:
    rows, mismatches = [], 0
    for record in sorted(records, key=lambda r: r.key):
        found = sorted((c.name, c.match_confidence) for c in record.celebrities)
        if record.error is not None:
            shown = f"failed: {record.error.code}"
            ok = record.key not in expected
        else:
            unknown = len(record.unrecognized_faces)
            shown = ", ".join(f"{name} ({confidence:.0f})" for name, confidence in found) or "nobody"
            shown += f" (+{unknown} unrecognized face{'s' if unknown != 1 else ''})" if unknown else ""
            ok = frozenset(name for name, _ in found) == expected.get(record.key)
        mismatches += not ok
        rows.append((record.key, shown, "ok" if ok else "UNEXPECTED"))
    width = max(len(row[0]) for row in rows)
    click.echo(f"{'image':<{width}}  who is in it")
    for key, shown, verdict in rows:
        click.echo(f"{key:<{width}}  {shown}" + ("" if verdict == "ok" else f"   <- {verdict}"))
    return mismatches


def _summary(store: ResultStore, scan_id: int | None) -> ScanSummary:
    scan_id = scan_id if scan_id is not None else store.latest_scan_id()
    summary = store.scan_summary(scan_id) if scan_id is not None else None
    if summary is None:
        raise click.ClickException(
            "no such scan" if scan_id is not None else "no scan yet; run `celebscan scan SOURCE`"
        )
    return summary


def format_summary(summary: ScanSummary, settings: Settings) -> str:
    counts = summary.counts
    state = "finished" if summary.finished_at else "running"
    listed = f"{summary.listed} listed" if summary.listing == "listed" else f"{summary.listed} listed so far"
    if summary.listing == "listing" and summary.listing_parts:
        ended, parts = summary.listing_parts
        listed += f" (the workers have listed {ended} of {parts} parts of the key space)"
    if summary.standing:
        state = "following" if summary.listing == "following" else state
        listed = f"{summary.listed} recorded from the bucket's events"
    lines = [
        f"scan {summary.id} ({state}): {summary.source}, backend {summary.backend}",
        f"  images: {listed}, {summary.skipped} skipped (already done), "
        f"{counts['queued']} queued, {counts['done']} done, {counts['failed']} failed",
    ]
    if summary.held_elsewhere or summary.handed_over:
        lines.append(
            f"  {summary.held_elsewhere} left to another scan that was working on them (recognized there, once); "
            f"{summary.handed_over} taken over by a later scan"
        )
    lines += _window_lines(summary, settings)
    if summary.standing:
        renewed = f", a follower renewed it {_ago(summary.followed_at)}" if summary.followed_at else ""
        lines.append(
            f"  standing scan: {summary.events} events applied, {_plural(summary.deletions, 'deletion')}; "
            f"{summary.deleted} of its images' objects are deleted (kept, left out of people and results){renewed}"
        )
    if _listing_stopped(summary, settings):
        lines.append(
            f"  the listing of {summary.source} stopped (the scan command listing it was interrupted): "
            f"continue it with celebscan scan --resume {summary.id}"
        )
    if summary.listing == "listing failed":
        lines.append(
            f"  listing failed: {summary.listing_error}; the images listed before are resumable: "
            f"celebscan scan --resume {summary.id}"
        )
    if summary.rate:
        eta = f", ETA {summary.eta_seconds:.0f} s" if counts["queued"] else ""
        lines.append(f"  rate: {summary.rate:.2f} images/s{eta}")
    if summary.backend in PAID_BACKENDS and settings.rekognition_tps and counts["queued"]:
        from producer.pace import duration

        lines.append(
            f"  at the quota ({env_var('rekognition_tps')}={settings.rekognition_tps:g} calls/s): "
            f"{duration(counts['queued'] / settings.rekognition_tps)} for the {counts['queued']:,} images queued"
        )
    if summary.failures:
        lines.append("  failures: " + ", ".join(f"{code} {n}" for code, n in sorted(summary.failures.items())))
    retrying = {code: n for code, n in summary.retrying.items() if code != OVER_BUDGET}
    if retrying:
        lines.append(
            "  retrying after transient errors (still queued): "
            + ", ".join(f"{code} {n}" for code, n in sorted(retrying.items()))
        )
    if summary.retrying.get(OVER_BUDGET):
        lines.append(
            f"  left out by --max-cost: {_plural(summary.retrying[OVER_BUDGET], 'video')} the budget left did not "
            f"pay for; continue with celebscan scan --resume {summary.id} --max-cost USD"
        )
    if summary.unserved:
        lines.append(
            f"  waiting: no worker has served this scan's batches: {summary.unserved}; "
            f"install what it names on the workers (pip install '.[local]') and restart them"
        )
    if summary.videos:
        lines.extend(_video_lines(summary, settings))
    lines.append(f"  faces: {summary.faces}; people found: {_people_found(summary) or 'nobody'}")
    if summary.backend in PAID_BACKENDS or summary.paid_calls:
        line = f"  paid calls: {summary.paid_calls} (estimated {usd(paid_cost(settings, summary.paid_calls))})"
        if summary.reused:
            line += f"; {summary.reused} duplicates reused (saved {usd(paid_cost(settings, summary.reused))})"
        if summary.calls_saved:
            line += (
                f"; the face prefilter saved {summary.calls_saved} calls "
                f"({usd(paid_cost(settings, summary.calls_saved))})"
            )
        lines.append(line)
    elif summary.reused:
        lines.append(f"  {summary.reused} duplicates reused (the same picture under another key: recognized once)")
    return "\n".join(lines)


def _people_found(summary: ScanSummary) -> str:
    """Each person with the images and videos they are in: ``obama (3 images, 1 video)``."""
    found = []
    for name in sorted(set(summary.people) | set(summary.people_in_videos)):
        counts = [_plural(summary.people.get(name, 0), "image")] if name in summary.people else []
        if name in summary.people_in_videos:
            counts.append(_plural(summary.people_in_videos[name], "video"))
        found.append(f"{name} ({', '.join(counts)})")
    return ", ".join(found)


def _video_lines(summary: ScanSummary, settings: Settings) -> list[str]:
    videos = summary.videos
    lines = [
        f"  of which videos: {videos['queued']} queued, {videos['done']} done, {videos['failed']} failed"
        + (" (a video waiting for its job is queued)" if videos["queued"] else "")
    ]
    if summary.backend in PAID_BACKENDS or summary.video_minutes:
        cost = summary.video_minutes * settings.rekognition_video_price
        lines.append(
            f"  Rekognition Video: {summary.video_jobs_running} jobs running for this scan "
            f"({summary.video_jobs_running_fleet} in the fleet, of {settings.rekognition_video_jobs} at once: "
            f"{env_var('rekognition_video_jobs')}); {summary.video_minutes:,.2f} minutes of video paid "
            f"(estimated {usd(cost)})"
        )
    return lines


def _listing_stopped(summary: ScanSummary, settings: Settings) -> bool:
    """A folder is listed by the scan command alone: when no page came for a lease, it died."""
    if summary.listing != "listing" or summary.source.startswith("s3://") or summary.finished_at:
        return False
    last = summary.listing_active_at or summary.created_at
    return (utcnow() - aware_utc(last)).total_seconds() > settings.lease_seconds


def _window_lines(summary: ScanSummary, settings: Settings) -> list[str]:
    """An unfinished scan's window: where its slots are, and what the fleet is repairing."""
    window = summary.window
    if window is None or summary.finished_at is not None:
        return []
    line = (
        f"  window: {_plural(window.size, 'slot')}: {window.running} working, {window.sent} in the broker, "
        f"{window.due} waiting for their next turn"
    )
    if window.repairs:
        line += f"; {_plural(window.repairs, 'time')} a lost slot was sent again"
    lines = [line]
    if window.lapsed:
        lines.append(
            f"  repairing: {_plural(window.lapsed, 'slot')} whose run stopped renewing it over a lease ago "
            "(its worker died or stalled): the window's keeper sends it again"
        )
    keeper_age = None if summary.keeper_at is None else (utcnow() - summary.keeper_at).total_seconds()
    if keeper_age is None or keeper_age > settings.lease_seconds:
        since = "" if keeper_age is None else f" for {keeper_age:.0f} s"
        lines.append(
            f"  no worker has kept the window{since}: none is running? Start one: celery -A worker.celery_app worker"
        )
    return lines


def _ago(moment) -> str:
    return f"{max(0.0, (utcnow() - aware_utc(moment)).total_seconds()):.0f} s ago"


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count:,} {one if count == 1 else many or one + 's'}"


def _embedder(settings: Settings):
    from worker.faces.embeddings import FaceEmbedder

    return FaceEmbedder.from_settings(settings)


def _label_stored_faces(app: App, enrollments) -> None:
    """Name the faces already stored that the people just enrolled (or re-embedded) match: no
    picture read again."""
    enrolled = {item.person for item in enrollments if item.status in ("enrolled", "re-embedded")}
    if not enrolled:
        return
    from worker.faces.labelling import Labeller

    labelled = Labeller(app.store.engine, app.settings).after_enrolling(enrolled)
    click.echo(f"stored faces named from the gallery: {labelled.changed:,} (of {labelled.looked_at:,} within reach)")


def _print_enrollments(enrollments) -> None:
    for item in enrollments:
        reason = f": {item.reason}" if item.reason else ""
        click.echo(f"{item.status}: {item.person} <- {item.source}{reason}")


def _reembed_stale_gallery(app: App, settings: Settings) -> None:
    """Before a local scan: the photos an older face model embedded are embedded again (after an
    upgrade), and the stored faces they match named, or the command says what to run where the
    models are installed."""
    gallery = Gallery(app.store.engine)
    stale = gallery.stale()
    if not stale:
        return
    try:
        embedder = _embedder(settings)
    except MissingDependencyError as exc:
        click.echo(f"{_plural(stale, 'gallery photo')} need re-embedding ({exc}); then: celebscan gallery reembed")
        return
    click.echo(f"re-embedding {_plural(stale, 'gallery photo')} with the face model {embedder.model.id}")
    results = gallery.reembed(embedder)
    _print_enrollments([item for item in results if item.status == "refused"])
    _label_stored_faces(app, results)


def _report_enrollments(enrollments) -> None:
    _print_enrollments(enrollments)
    if enrollments and all(item.status == "refused" for item in enrollments):
        raise GalleryError("no photo could be enrolled")


def _add_face_commands() -> None:
    from producer import faces_cli

    cli.add_command(faces_cli.find)
    cli.add_command(faces_cli.faces)
    for command in faces_cli.PEOPLE_COMMANDS:
        people.add_command(command)


def main() -> None:
    cli(prog_name="celebscan")


if __name__ == "__main__":
    # ``python -m producer.cli``: run the module proper, to which producer.faces_cli (importing it)
    # adds its commands; adding them to this script's copy would import that module half made.
    from producer.cli import main as module_main

    module_main()
elif __name__ != "__mp_main__":  # a pool process's copy of that script never runs a command
    _add_face_commands()
