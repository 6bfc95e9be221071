"""The one settings object, read from the environment.

Every field has an environment variable; the CLI's options override them. Nothing else in the
project reads ``os.environ`` for configuration, so this module is the complete list.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.backends import BACKENDS
from worker.errors import ConfigurationError

DEFAULT_DATABASE_URL = "sqlite:///celebscan.db"
#: US East (N. Virginia) list price of Rekognition's Group 2 image calls (RecognizeCelebrities), per
#: image, for the next N images billed in a month (https://aws.amazon.com/rekognition/pricing/).
DEFAULT_REKOGNITION_PRICES = "0.001:1000000,0.0008:4000000,0.0006:30000000,0.00025"


def _setting(
    default: Any, env: str, help: str, *, minimum: float | None = None, choices: tuple[str, ...] | None = None
) -> Any:
    return field(default=default, metadata={"env": env, "help": help, "minimum": minimum, "choices": choices})


@dataclass(frozen=True)
class Settings:
    database_url: str = _setting(
        DEFAULT_DATABASE_URL, "CELEBSCAN_DATABASE_URL", "SQLAlchemy URL of the results database."
    )
    database_secret_arn: str = _setting(
        "",
        "CELEBSCAN_DATABASE_SECRET_ARN",
        "Secrets Manager secret whose username/password (and host, port, dbname) complete the database URL.",
    )
    backend: str = _setting(
        "local",
        "CELEBSCAN_BACKEND",
        "Default recognizer of `scan`: local or rekognition (workers serve every scan).",
        choices=BACKENDS,
    )
    workers: int = _setting(
        0,
        "CELEBSCAN_WORKERS",
        "Processes for an embedded scan (0: one per CPU core).",
        minimum=0,
    )
    batch_size: int = _setting(16, "CELEBSCAN_BATCH_SIZE", "Images per batch (per task).", minimum=1)
    broker_url: str = _setting(
        "",
        "CELERY_BROKER_URL",
        "Celery broker; when set, `scan` lists into the database and Celery workers do the work.",
    )
    endpoint_url: str = _setting(
        "", "CELEBSCAN_ENDPOINT_URL", "Endpoint for S3-compatible stores and local AWS stand-ins."
    )
    match_threshold: float = _setting(
        0.0,
        "CELEBSCAN_MATCH_THRESHOLD",
        "Local recognizer: largest distance between unit-length face embeddings that names a face "
        "(0: the face model's own, 1.128 for SFace).",
        minimum=0.0,
    )
    min_face_score: float = _setting(
        0.7,
        "CELEBSCAN_MIN_FACE_SCORE",
        "Local recognizer and face prefilter: YuNet detector score (0-1) below which a detection is ignored.",
        minimum=0.0,
    )
    detect_max_side: int = _setting(
        640,
        "CELEBSCAN_DETECT_MAX_SIDE",
        "Local recognizer and face prefilter: images are downscaled to this side for detection "
        "(faces from ~1/64 of it are found; larger ones by a second pass at 240).",
        minimum=240,
    )
    keep_face_embeddings: bool = _setting(
        True,
        "CELEBSCAN_KEEP_FACE_EMBEDDINGS",
        "Keep every face's embedding (256 bytes, biometric data) so later enrolling, `find` and unknown groups "
        "need no rescan; false: keep none.",
    )
    unknown_min_faces: int = _setting(
        3,
        "CELEBSCAN_UNKNOWN_MIN_FACES",
        "Unknown groups: unnamed neighbours a face needs within the distance to start or join a group.",
        minimum=1,
    )
    unknown_max_distance: float = _setting(
        0.0,
        "CELEBSCAN_UNKNOWN_MAX_DISTANCE",
        "Unknown groups: largest distance between unit-length embeddings of neighbours in one unnamed person "
        "(0: the face model's own, 1.0 for SFace).",
        minimum=0.0,
    )
    face_index_dir: str = _setting(
        "~/.cache/celebscan/face-index",
        "CELEBSCAN_FACE_INDEX_DIR",
        "Where `find` and the unknown groups keep their vector index of the stored faces (rebuilt from the database).",
    )
    max_image_pixels: int = _setting(
        100_000_000,
        "CELEBSCAN_MAX_IMAGE_PIXELS",
        "Images with more pixels are refused (decompression-bomb guard).",
        minimum=1,
    )
    max_image_bytes: int = _setting(
        100 * 1024 * 1024,
        "CELEBSCAN_MAX_IMAGE_BYTES",
        "Objects larger than this are refused without reading.",
        minimum=1,
    )
    min_image_side: int = _setting(
        80,
        "CELEBSCAN_MIN_IMAGE_SIDE",
        "Images with a smaller width or height are refused as too small.",
        minimum=1,
    )
    max_attempts: int = _setting(
        5,
        "CELEBSCAN_MAX_ATTEMPTS",
        "Tries of a read or recognizer call in a row, with backoff, before a transient error hands the image back.",
        minimum=1,
    )
    retry_deadline: int = _setting(
        3600,
        "CELEBSCAN_RETRY_DEADLINE",
        "Seconds an image keeps being handed out again after transient errors (throttling, 5xx) before it fails.",
        minimum=0,
    )

    rekognition_tps: float = _setting(
        0.0,
        "CELEBSCAN_REKOGNITION_TPS",
        "Rekognition calls per second shared by all workers (the account's quota); 0: no pacing.",
        minimum=0,
    )
    calls_in_flight: int = _setting(
        32,
        "CELEBSCAN_CALLS_IN_FLIGHT",
        "Rekognition calls a worker process keeps in flight at once (threads waiting on the network; each holds "
        "its image in memory); the local recognizer works one image at a time.",
        minimum=1,
    )
    video_frames_per_second: float = _setting(
        1.0,
        "CELEBSCAN_VIDEO_FRAMES_PER_SECOND",
        "Local recognizer: frames of a video recognized per second of video, sampled evenly.",
        minimum=0.01,
    )
    video_gap_seconds: float = _setting(
        2.0,
        "CELEBSCAN_VIDEO_GAP_SECONDS",
        "A person seen again in a video within this many seconds (at least 1.5 sampling intervals) stays in one "
        "time range.",
        minimum=0,
    )
    video_slice_seconds: float = _setting(
        60.0,
        "CELEBSCAN_VIDEO_SLICE_SECONDS",
        "Local recognizer: seconds a run works on one video (at most half CELEBSCAN_BATCH_SECONDS) before it saves "
        "where it got to and hands the video on.",
        minimum=0.1,
    )
    max_video_bytes: int = _setting(
        10 * 1024**3,
        "CELEBSCAN_MAX_VIDEO_BYTES",
        "Videos larger than this fail unread (VideoTooLarge); Rekognition Video takes at most 10 GB.",
        minimum=1,
    )
    rekognition_video_jobs: int = _setting(
        20,
        "CELEBSCAN_REKOGNITION_VIDEO_JOBS",
        "Rekognition Video jobs running at once, fleet-wide: the account's quota of concurrent stored-video jobs.",
        minimum=1,
    )
    video_poll_seconds: float = _setting(
        5.0,
        "CELEBSCAN_VIDEO_POLL_SECONDS",
        "Rekognition Video: the first look at a job after it starts, and the least time between looks (they "
        "grow with the job's age, up to CELEBSCAN_VIDEO_POLL_MAX_SECONDS).",
        minimum=0.1,
    )
    video_poll_max_seconds: float = _setting(
        60.0,
        "CELEBSCAN_VIDEO_POLL_MAX_SECONDS",
        "Rekognition Video: the most time between looks at a job; with SNS completions, how long a job waits "
        "for its message before it is looked at anyway.",
        minimum=0.1,
    )
    video_completions_queue_url: str = _setting(
        "",
        "CELEBSCAN_VIDEO_COMPLETIONS_QUEUE_URL",
        "Rekognition Video: the SQS queue of the SNS topic that announces finished jobs (`celebscan video-jobs "
        "--setup` makes both); empty: jobs are polled.",
    )
    video_sns_topic_arn: str = _setting(
        "",
        "CELEBSCAN_VIDEO_SNS_TOPIC_ARN",
        "Rekognition Video: the SNS topic its jobs announce their end on (with CELEBSCAN_VIDEO_SNS_ROLE_ARN).",
    )
    video_sns_role_arn: str = _setting(
        "",
        "CELEBSCAN_VIDEO_SNS_ROLE_ARN",
        "Rekognition Video: the IAM role it assumes to publish to CELEBSCAN_VIDEO_SNS_TOPIC_ARN.",
    )
    rate_limit_url: str = _setting(
        "",
        "CELEBSCAN_RATE_LIMIT_URL",
        "Redis for the shared rate limit (default: CELERY_BROKER_URL when it is Redis).",
    )
    window: int = _setting(
        256,
        "CELEBSCAN_WINDOW",
        "Batches of a scan in the broker at most (each a few hundred bytes); at least the worker processes.",
        minimum=1,
    )
    report_per_person: int = _setting(
        12,
        "CELEBSCAN_REPORT_PER_PERSON",
        "Pictures `celebscan report` shows of each person found (and of images with nobody recognized).",
        minimum=1,
    )
    listing_parts: int = _setting(
        64,
        "CELEBSCAN_LISTING_PARTS",
        "With a broker: parts of an S3 key space the workers list in parallel; more than the fleet's processes.",
        minimum=1,
    )
    visibility_timeout: int = _setting(
        3600,
        "CELEBSCAN_VISIBILITY_TIMEOUT",
        "Seconds before Redis hands an unacknowledged batch to another worker (longer than any batch).",
        minimum=1,
    )
    lease_seconds: float = _setting(
        120.0,
        "CELEBSCAN_LEASE_SECONDS",
        "Seconds a claim (on images, a picture being recognized, a listing part) lasts unless its holder "
        "renews it (every quarter lease): a crashed worker's claims are taken over after this.",
        minimum=1,
    )
    batch_seconds: float = _setting(
        300.0,
        "CELEBSCAN_BATCH_SECONDS",
        "A run starts no image after this many seconds (at most half CELEBSCAN_VISIBILITY_TIMEOUT) and gives "
        "back what it did not reach.",
        minimum=1,
    )

    follow_source: str = _setting(
        "",
        "CELEBSCAN_FOLLOW_SOURCE",
        "The s3://bucket/prefix/ that `celebscan follow` follows when given none (the Procfile's events line).",
    )
    follow_backend: str = _setting(
        "",
        "CELEBSCAN_FOLLOW_BACKEND",
        "The recognizer `celebscan follow` records uploads for when given no --backend (empty: CELEBSCAN_BACKEND's).",
        choices=("", *BACKENDS),
    )
    events_queue_url: str = _setting(
        "",
        "CELEBSCAN_EVENTS_QUEUE_URL",
        "The SQS queue of S3 Event Notifications `celebscan follow` reads when given no --queue.",
    )

    rekognition_prices: str = _setting(
        DEFAULT_REKOGNITION_PRICES,
        "CELEBSCAN_REKOGNITION_PRICES",
        "Rekognition's price per image by monthly tier: PRICE:IMAGES,... and a last PRICE for the rest.",
    )
    rekognition_video_price: float = _setting(
        0.10,
        "CELEBSCAN_REKOGNITION_VIDEO_PRICE",
        "USD per minute of stored video analysed by Rekognition Video's celebrity recognition.",
        minimum=0,
    )
    worker_concurrency: int = _setting(
        2,
        "CELEBSCAN_WORKER_CONCURRENCY",
        "Worker processes per machine (the deploy kit's WorkerConcurrency): `estimate` sizes the fleet with it.",
        minimum=1,
    )
    worker_hourly_price: float = _setting(
        0.0416,
        "CELEBSCAN_WORKER_HOURLY_PRICE",
        "USD per hour of one worker machine (t3.medium on demand in us-east-1): `estimate` prices the fleet.",
        minimum=0,
    )
    rekognition_billed_this_month: int = _setting(
        0,
        "CELEBSCAN_REKOGNITION_BILLED_THIS_MONTH",
        "Images already billed this month: where the price tiers start.",
        minimum=0,
    )
    cloudwatch_namespace: str = _setting(
        "",
        "CELEBSCAN_CLOUDWATCH_NAMESPACE",
        "CloudWatch namespace of `metrics --cloudwatch` (default Celebscan); "
        "when set, `scan` publishes after enqueueing.",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw not in (None, ""):
                values[f.name] = _convert(f, raw)
        return cls(**values)

    def __post_init__(self) -> None:
        """Every value checked where it is read, before anything is written: a one-line error."""
        for f in dataclasses.fields(self):
            value, name, meta = getattr(self, f.name), f.metadata["env"], f.metadata
            kind = _type_name(f)
            if not isinstance(value, _TYPES[kind]) or (kind != "bool" and isinstance(value, bool)):
                raise ConfigurationError(f"{name}={value!r} is not a valid {kind}")
            if meta["minimum"] is not None and value < meta["minimum"]:
                raise ConfigurationError(f"{name}={value!r} is out of range: it must be at least {meta['minimum']}")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ConfigurationError(f"{name}={value!r} is not one of: {', '.join(meta['choices'])}")

    def replace(self, **overrides: Any) -> Settings:
        """A copy with the given fields changed; ``None`` values are ignored (option not given)."""
        given = {name: value for name, value in overrides.items() if value is not None}
        return dataclasses.replace(self, **given)

    @property
    def run_seconds(self) -> float:
        """How long a run works on a batch before it gives back the rest: well inside the time
        Redis waits before it hands the message to another worker."""
        return min(self.batch_seconds, self.visibility_timeout / 2)

    @property
    def embedded(self) -> bool:
        """True when scans run in a local process pool rather than through a broker."""
        return not self.broker_url


#: The Python types of settings fields (annotations are strings here), and what each accepts.
_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float), "bool": bool}
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _convert(f: dataclasses.Field, raw: str) -> Any:
    """An environment variable's text as the field's type (``int``, ``float``, ``bool`` or ``str``)."""
    kind = _type_name(f)
    try:
        if kind == "bool":
            return _BOOLS[raw.strip().lower()]
        return {"int": int, "float": float, "str": str}[kind](raw)
    except (KeyError, ValueError) as exc:
        raise ConfigurationError(f"{f.metadata['env']}={raw!r} is not a valid {kind}") from exc


def _type_name(f: dataclasses.Field) -> str:
    """The field's type as a name: annotations are strings where ``from __future__ import annotations`` is on."""
    return f.type if isinstance(f.type, str) else f.type.__name__


def env_var(name: str) -> str:
    """The environment variable of a settings field, for help texts."""
    return next(f.metadata["env"] for f in dataclasses.fields(Settings) if f.name == name)


def documented_settings() -> list[tuple[str, str, str]]:
    """(environment variable, default, help) for every setting: docs/settings.md's table."""
    return [(f.metadata["env"], repr(f.default), f.metadata["help"]) for f in dataclasses.fields(Settings)]
