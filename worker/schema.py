"""The results database's tables (SQLAlchemy Core), shared by the producer, workers and gallery."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

QUEUED, DONE, FAILED = "queued", "done", "failed"
#: ``faces.labelled_by`` of a name the enrolled gallery gave (and may take back).
GALLERY = "gallery"
#: What a followed object's latest event did (``object_events.kind``).
CREATED, REMOVED = "created", "removed"
STATUSES = (QUEUED, DONE, FAILED)

#: A standing scan whose events are still being recorded.
_OPEN_STANDING = "standing AND listing_finished_at IS NULL AND listing_error IS NULL"

scans = Table(
    "scans",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("source", Text, nullable=False),
    Column("backend", String(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    # Images the listing found, and those of them skipped because an identical copy was already done.
    Column("listed", Integer, nullable=False, default=0),
    Column("skipped", Integer, nullable=False, default=0),
    # Run the local face detector first and send only images with a face to the paid service.
    Column("prefilter_faces", Boolean, nullable=False, server_default=text("false")),
    # Images a worker claims at a time (NULL: the worker's CELEBSCAN_BATCH_SIZE).
    Column("batch_size", Integer),
    # --max-cost: how many images may be handed out to the paid recognizer (NULL: no limit), and
    # how many have been (each image counts once, when it is first claimed).
    Column("budget_images", BigInteger),
    Column("handed_out", BigInteger, nullable=False, server_default=text("0")),
    # The last time a worker handed a batch of this scan back because it could not run what the
    # batch needs (e.g. the local recognizer without the local extra), and why: shown by status.
    Column("unserved_at", DateTime(timezone=True)),
    # When listing the source ended, or why it stopped part-way (the images listed stay queued).
    Column("listing_finished_at", DateTime(timezone=True)),
    Column("listing_error", Text),
    Column("unserved_reason", Text),
    # Reuse the known result of a picture already recognized (same bytes) instead of a new call;
    # false for a scan run with --force.
    Column("reuse_results", Boolean, nullable=False, server_default=text("true")),
    # Listed images this scan left to another scan that holds them in flight (a live claim): they
    # are recognized once, there. And images that a later scan took over from this one (queued
    # ones nobody held, failed ones it retried, done ones it redid with --force). So a scan's
    # figures add up: listed = skipped + held_elsewhere + (its images + handed_over).
    Column("held_elsewhere", BigInteger, nullable=False, server_default=text("0")),
    Column("handed_over", BigInteger, nullable=False, server_default=text("0")),
    # The calls the images handed over had cost in this scan (a call is counted where it was made).
    Column("handed_over_paid_calls", BigInteger, nullable=False, server_default=text("0")),
    Column("handed_over_calls_saved", BigInteger, nullable=False, server_default=text("0")),
    # The S3 Inventory manifest the scan read instead of listing (``--resume`` reads it again).
    Column("inventory", Text),
    # A standing scan (``celebscan follow``): its "listing" is the bucket's events, open while a
    # follower renews ``followed_at`` (a lease, CELEBSCAN_LEASE_SECONDS); one per source and backend
    # at a time. When nobody followed it for a lease, its listing ends and it finishes once drained.
    Column("standing", Boolean, nullable=False, server_default=text("false")),
    Column("followed_at", DateTime(timezone=True)),
    # S3 events recorded by its followers, and those of them that deleted an object.
    Column("events", BigInteger, nullable=False, server_default=text("0")),
    Column("deletions", BigInteger, nullable=False, server_default=text("0")),
    # How long the oldest message of the last receive that brought any had waited in the queue
    # (``metrics`` reports it: the events' lag).
    Column("event_lag_seconds", Float),
    # With a broker: how many window slots the scan has (``window_slots``, made with the scan);
    # NULL for a scan drained by the ``scan`` command's own processes.
    Column("window", Integer),
    # Without a broker: when the ``scan`` command draining the scan last said it was alive (a lease,
    # CELEBSCAN_LEASE_SECONDS): a later scan leaves the images of a live scan to it.
    Column("drained_at", DateTime(timezone=True)),
    # --max-cost with videos: the price of the last images the budget affords. A Rekognition Video
    # job takes as many of them out of the budget as its minutes cost (worker/queue/videos.py), so
    # images and videos together never spend more than the budget.
    Column("budget_unit_usd", Float),
    # At most one open standing scan per source and backend: two followers starting together share one.
    Index(
        "uq_scans_standing",
        "source",
        "backend",
        unique=True,
        postgresql_where=text(_OPEN_STANDING),
        sqlite_where=text(_OPEN_STANDING),
    ),
)

images = Table(
    "images",
    metadata,
    Column("id", Integer, primary_key=True),
    # The scan that last queued this image; it moves to a new scan when a rescan retries the image.
    Column("scan_id", Integer, ForeignKey("scans.id"), nullable=False),
    # The bucket for S3, the absolute folder path for a local source.
    Column("bucket", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("etag", String(128), nullable=False),
    # MD5 of the bytes, as the worker read them (a folder's etag is its size and mtime).
    Column("content_hash", String(32)),
    Column("size", BigInteger, nullable=False),
    Column("backend", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("error_code", String(64)),
    Column("error_message", Text),
    # Runs that started this image and never wrote its outcome (a crash, a lost lease): an image
    # that keeps killing workers is quarantined. ``started_by`` is the claim token of the last run
    # that started it, kept after its write: a write replayed after a lost acknowledgement finds
    # its own rows by it (worker/queue/images.py).
    Column("attempts", Integer, nullable=False, default=0),
    Column("started_by", String(100)),
    # The broker is a window onto the queued images: a run claims a batch of them (its claim token,
    # and when it last renewed the lease), and releases the claim when it defers images until
    # ``not_before``. Every transition of a queued image names the token (a fencing token).
    Column("claimed_by", String(100)),
    Column("claimed_at", DateTime(timezone=True)),
    Column("not_before", DateTime(timezone=True)),
    Column("width", Integer),
    Column("height", Integer),
    Column("queued_at", DateTime(timezone=True)),
    Column("processed_at", DateTime(timezone=True)),
    # Calls billed by a paid recognizer for this image (more than 1 when a lost batch was redone),
    # and calls the face prefilter saved (the image had no face and was not sent).
    Column("paid_calls", Integer, nullable=False, server_default=text("0")),
    Column("calls_saved", Integer, nullable=False, server_default=text("0")),
    # Tries that ended in a transient error (throttling, 5xx, ...) and when the first did: the
    # image stays queued and is handed out again until CELEBSCAN_RETRY_DEADLINE has passed since.
    Column("retries", Integer, nullable=False, server_default=text("0")),
    Column("retry_since", DateTime(timezone=True)),
    # The image whose result this one copies (the same picture under another key): no call was made.
    Column("copied_from", Integer),
    # Milliseconds a worker spent on the image (read, decode, recognize): `estimate` sizes a fleet with it.
    Column("work_ms", Integer),
    # When a followed bucket said the object was deleted (``celebscan follow``): the row is kept
    # for history and left out of people, results and the report unless asked for.
    Column("deleted_at", DateTime(timezone=True)),
    # 'video' for a video (its result is appearances, worker/videos/), NULL for an image.
    Column("media", String(16)),
    # A video's length, from its container's header (milliseconds).
    Column("duration_ms", BigInteger),
    UniqueConstraint("bucket", "key", "etag", "backend", name="uq_images_natural_key"),
    # With the id last, "is anything of this scan still queued?" reads the index backwards from the
    # newest images, which stay queued longest, instead of wading through the entries that finished
    # images leave behind until vacuum (a cost that grew with every batch of a big scan).
    Index("ix_images_scan_status_id", "scan_id", "status", "id"),
    # Pictures already recognized, by their bytes' MD5 (an S3 ETag of a single-part upload is that
    # MD5, so a copy is found before it is even read): pay once per picture.
    Index(
        "ix_images_known_pictures",
        "content_hash",
        "size",
        "backend",
        postgresql_where=text("status = 'done' AND content_hash IS NOT NULL"),
        sqlite_where=text("status = 'done' AND content_hash IS NOT NULL"),
    ),
    # Only the claims in flight (a claim is cleared when its image is written): small at any size.
    Index(
        "ix_images_claimed_by",
        "claimed_by",
        postgresql_where=text("claimed_by IS NOT NULL"),
        sqlite_where=text("claimed_by IS NOT NULL"),
    ),
    # Only the deleted objects' rows (a followed bucket's deletions): few, read by
    # ``people --include-deleted``.
    Index(
        "ix_images_deleted",
        "deleted_at",
        postgresql_where=text("deleted_at IS NOT NULL"),
        sqlite_where=text("deleted_at IS NOT NULL"),
    ),
    # Only the queued videos, by their bytes: whether a Rekognition Video job still has a video
    # that follows it (the fleet's quota counts only those, worker/queue/videos.py).
    Index(
        "ix_images_queued_videos",
        "etag",
        "size",
        postgresql_where=text("media = 'video' AND status = 'queued'"),
        sqlite_where=text("media = 'video' AND status = 'queued'"),
    ),
)

listing_parts = Table(
    "listing_parts",
    metadata,
    Column("id", Integer, primary_key=True),
    # With a broker, a scan's S3 key space is split into parts that the workers list (worker/listing_parts.py).
    Column("scan_id", Integer, ForeignKey("scans.id"), nullable=False),
    Column("prefix", Text, nullable=False),
    # The last key recorded: a part picked up again (a slice ended, a worker died) lists on after it,
    # committed with the images it closes, so nothing is listed twice or skipped.
    Column("last_key", Text),
    # Objects the part recorded, those of them skipped (done before), and those left to another
    # scan that holds them in flight: a scan's figures add its parts'.
    Column("listed", BigInteger, nullable=False, server_default=text("0")),
    Column("skipped", BigInteger, nullable=False, server_default=text("0")),
    Column("held_elsewhere", BigInteger, nullable=False, server_default=text("0")),
    Column("force", Boolean, nullable=False, server_default=text("false")),
    Column("status", String(16), nullable=False),  # queued (to list), done, failed
    Column("error", Text),
    # Who lists the part now (a claim token: a message's run, or a producer), and when it last
    # recorded a page or renewed its claim (a lease, as images' claims). Kept once the part ended.
    Column("claimed_by", String(100)),
    Column("claimed_at", DateTime(timezone=True)),
    Index("ix_listing_parts_scan_status", "scan_id", "status"),
)

window_slots = Table(
    "window_slots",
    metadata,
    # A scan's window, one row per slot (worker/queue/slots.py): each slot is at most one message in
    # the broker, named by its generation, so a stale, repeated or late message changes nothing, and
    # a slot whose message is lost (or held by a dead node, or acknowledged with a killed run) is
    # noticed from here and sent again by the window's keeper.
    Column("scan_id", Integer, ForeignKey("scans.id"), nullable=False),
    Column("slot", Integer, nullable=False),
    # due (waits here until due_at), sent (its message is in the broker), running (a run holds it:
    # holder, with held_at as its lease), ended (its scan finished).
    Column("state", String(16), nullable=False),
    Column("generation", Integer, nullable=False, server_default=text("0")),
    Column("holder", String(100)),
    # When the slot was sent (state sent), or its holder last renewed it (running).
    Column("held_at", DateTime(timezone=True)),
    Column("due_at", DateTime(timezone=True)),
    # Turns in a row that found nothing to claim: the slot waits longer each time (up to 30 s).
    Column("idle_rounds", Integer, nullable=False, server_default=text("0")),
    # Times the keeper sent the slot again because its message was gone or its run had stopped.
    Column("repairs", Integer, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("scan_id", "slot", name="pk_window_slots"),
    Index("ix_window_slots_state_due", "state", "due_at"),
)

keepers = Table(
    "keepers",
    metadata,
    # Fleet-wide duties that one process does at a time, held by a lease (worker/keeper.py): the
    # window's keeper sends due slots and repairs lost ones.
    Column("name", String(32), primary_key=True),
    Column("holder", String(100), nullable=False),
    Column("held_at", DateTime(timezone=True), nullable=False),
)

pictures = Table(
    "pictures",
    metadata,
    # A picture (its bytes: MD5 and size) being recognized right now by one holder, so that its
    # copies under other keys wait for that result instead of paying again (worker/queue/pictures.py).
    # A row lives from just before the call until the holder's write; a crashed holder's row is
    # taken over once its lease ran out.
    Column("backend", String(32), nullable=False),
    Column("content_hash", String(32), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("holder", String(100), nullable=False),
    Column("held_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("backend", "content_hash", "size", name="pk_pictures"),
    Index("ix_pictures_holder", "holder"),
)

object_events = Table(
    "object_events",
    metadata,
    # The latest S3 event a follower applied to each followed object (worker/queue/objects.py): an event whose
    # sequencer is not later than this one's came out of order, or again, and changes nothing.
    Column("bucket", Text, nullable=False),
    Column("key", Text, nullable=False),
    # Per backend: a follower of each backend orders its own copy of the events (SNS fan-out).
    Column("backend", String(32), nullable=False),
    # S3's sequencer, upper-case and right-padded with zeros to a fixed width so that the text
    # order is S3's order; '' when the sender gave none (every such event applies).
    Column("sequencer", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # created, removed
    # The created version's ETag (NULL for a removal): a catch-up listing that saw another version
    # just before this event was applied records nothing gone from the bucket.
    Column("etag", String(128)),
    Column("applied_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("bucket", "key", "backend", name="pk_object_events"),
)

write_receipts = Table(
    "write_receipts",
    metadata,
    # What a run's write did, kept in its transaction: a write replayed because its commit's
    # acknowledgement was lost finds it and does nothing more, even after its images moved on
    # (worker/queue/images.py). Gone with the run's release; the window's keeper clears old ones.
    Column("token", String(100), nullable=False),
    Column("first_image", Integer, nullable=False),
    Column("written", JSON, nullable=False),
    Column("refused", JSON, nullable=False),
    Column("scan_ids", JSON, nullable=False),
    Column("written_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("token", "first_image", name="pk_write_receipts"),
    Index("ix_write_receipts_written_at", "written_at"),
)

refused_writes = Table(
    "refused_writes",
    metadata,
    # A write by a holder that had lost its claim (its lease ran out and another holder took the
    # image): refused, and kept here so that the call it paid for is still counted, once.
    Column("image_id", Integer, nullable=False),
    Column("token", String(100), nullable=False),
    Column("scan_id", Integer),
    Column("status", String(16), nullable=False),  # what the refused write would have set
    Column("paid_calls", Integer, nullable=False, server_default=text("0")),
    Column("refused_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("image_id", "token", name="pk_refused_writes"),
    Index("ix_refused_writes_scan", "scan_id"),
)

faces = Table(
    "faces",
    metadata,
    Column("id", Integer, primary_key=True),
    # Not a declared foreign key: PostgreSQL checks one with a lookup and a row lock per inserted
    # face, 9 µs of the ~15 µs a face row costs the server (bench/store_writes.py). The store writes
    # faces only in the transaction that updates their image, for the images that write updated
    # (those its run still held), and celebscan never deletes images.
    Column("image_id", Integer, nullable=False),
    Column("face_index", Integer, nullable=False),
    Column("name", Text),
    Column("person_id", Text),
    Column("match_confidence", Float),
    Column("face_confidence", Float),
    Column("box_left", Float, nullable=False),
    Column("box_top", Float, nullable=False),
    Column("box_width", Float, nullable=False),
    Column("box_height", Float, nullable=False),
    Column("urls", JSON),
    Column("known_gender", String(32)),
    Column("landmarks", JSON),
    # The recognizer's whole face record (pose, quality, emotions, ...), as the vendor sent it.
    Column("details", JSON),
    # The face remembered (worker/faces/): its embedding as float16 (256 bytes), stamped with the
    # model that made it (embeddings of two models are never compared); NULL when none is kept
    # (CELEBSCAN_KEEP_FACE_EMBEDDINGS off, erased, or its object deleted).
    Column("embedding", LargeBinary),
    Column("embedding_model", String(64)),
    # Who gave the face its name: 'gallery' (an enrolled person, at scan time or later: the gallery
    # may take it back or give another, worker/queue/labels.py); NULL with a name: the recognizer
    # (Rekognition's celebrity name, kept whatever the gallery says).
    Column("labelled_by", String(16)),
    # The unnamed person (unknown_people.id) an unrecognized face was grouped into; 0: taken out of
    # its group by hand and never grouped again; NULL: not grouped (yet).
    Column("unknown_id", Integer),
    UniqueConstraint("image_id", "face_index", name="uq_faces_image_index"),
    # Who is where (worker/findings.py): a person's images by name or by Rekognition id read only
    # that person's entries; grouping by name reads this index alone, in order.
    Index(
        "ix_faces_name",
        "name",
        "person_id",
        "image_id",
        postgresql_where=text("name IS NOT NULL"),
        sqlite_where=text("name IS NOT NULL"),
    ),
    # The faces of an unnamed person (``people --unknown``, naming or merging a group).
    Index(
        "ix_faces_unknown",
        "unknown_id",
        "image_id",
        postgresql_where=text("unknown_id IS NOT NULL"),
        sqlite_where=text("unknown_id IS NOT NULL"),
    ),
    Index(
        "ix_faces_person_id",
        "person_id",
        "image_id",
        postgresql_where=text("person_id IS NOT NULL"),
        sqlite_where=text("person_id IS NOT NULL"),
    ),
    # A face's id is never given out again (SQLite's plain rowid reuses the largest after a delete):
    # the face index knows faces by id (worker/faces/index.py).
    sqlite_autoincrement=True,
)

face_removals = Table(
    "face_removals",
    metadata,
    # Faces whose embedding left the database (replaced by a rescan, erased, or their object
    # deleted): an index built from the database (worker/faces/index.py) drops them at its next
    # refresh, so no copy of an erased embedding outlives it. ``seq`` only grows (AUTOINCREMENT on
    # SQLite too, where a plain rowid is reused), so a refresh reads what it has not seen.
    Column("seq", Integer, primary_key=True),
    Column("face_id", Integer, nullable=False),
    Column("removed_at", DateTime(timezone=True), nullable=False),
    sqlite_autoincrement=True,
)

unknown_people = Table(
    "unknown_people",
    metadata,
    # An unnamed person: a group of unrecognized faces alike enough to be one person
    # (worker/faces/grouping.py). ``merged_into``: merged into that group; ``named``: enrolled
    # under that name (its faces then carry the name).
    Column("id", Integer, primary_key=True),
    Column("embedding_model", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("merged_into", Integer),
    Column("named", Text),
    sqlite_autoincrement=True,
)

video_jobs = Table(
    "video_jobs",
    metadata,
    # The work on one video's bytes with one backend (worker/queue/videos.py): a Rekognition Video
    # job, or the local recognizer's progress through the frames. Every row (key) holding those
    # bytes follows the one job, so a video is paid for, or worked on, once.
    Column("id", Integer, primary_key=True),
    Column("backend", String(32), nullable=False),
    # The bytes: the S3 ETag as listed (the same bytes under another key have the same one), or
    # the MD5 a worker computed of a local file; and the size.
    Column("content_key", String(128), nullable=False),
    Column("size", BigInteger, nullable=False),
    # Where the job reads the video (the row that started it), and the scan and row it counts for.
    Column("bucket", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("scan_id", Integer),
    Column("image_id", Integer),
    Column("status", String(16), nullable=False),  # idle, running, succeeded, failed
    # Rekognition Video: the idempotency token each start of the job sends (the same token returns
    # the same JobId: a start repeated after a crash starts nothing), and the JobId once recorded.
    # ``generation`` counts the jobs of these bytes (--force starts a new one).
    Column("request_token", String(64)),
    Column("job_id", String(64)),
    Column("generation", Integer, nullable=False, server_default=text("0")),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    # The video's length from its header: what a Rekognition Video job bills; and the images of its
    # scan's --max-cost budget the job took (given back if it never started).
    Column("duration_ms", BigInteger),
    Column("budget_images", BigInteger, nullable=False, server_default=text("0")),
    # Local: how far the frames were recognized, and the appearances found so far.
    Column("position_ms", BigInteger, nullable=False, server_default=text("0")),
    Column("progress", JSON),
    # The finished result (appearances and the video's size), copied to each row of these bytes.
    Column("result", JSON),
    Column("error_code", String(64)),
    Column("error_message", Text),
    UniqueConstraint("backend", "content_key", "size", name="uq_video_jobs_content"),
    Index(
        "ix_video_jobs_job_id",
        "job_id",
        postgresql_where=text("job_id IS NOT NULL"),
        sqlite_where=text("job_id IS NOT NULL"),
    ),
    Index("ix_video_jobs_status", "backend", "status"),
)

appearances = Table(
    "appearances",
    metadata,
    # A person in a video (worker/videos/appearances.py): the time ranges they are seen in, their
    # best match confidence, and the frame of that best match with the face's box (ratios).
    Column("image_id", Integer, nullable=False),
    Column("appearance_index", Integer, nullable=False),
    Column("name", Text, nullable=False),
    Column("person_id", Text),
    Column("match_confidence", Float, nullable=False),
    Column("ranges", JSON, nullable=False),  # [[start_ms, end_ms], ...]
    Column("detections", Integer, nullable=False),
    Column("frame_ms", BigInteger, nullable=False),
    Column("box_left", Float, nullable=False),
    Column("box_top", Float, nullable=False),
    Column("box_width", Float, nullable=False),
    Column("box_height", Float, nullable=False),
    Column("urls", JSON),
    Column("known_gender", String(32)),
    PrimaryKeyConstraint("image_id", "appearance_index", name="pk_appearances"),
    Index("ix_appearances_name", "name", "person_id", "image_id"),
    Index(
        "ix_appearances_person_id",
        "person_id",
        "image_id",
        postgresql_where=text("person_id IS NOT NULL"),
        sqlite_where=text("person_id IS NOT NULL"),
    ),
)

person_videos = Table(
    "person_videos",
    metadata,
    # How many videos of a scan each person appears in, kept with the appearances (as person_images).
    Column("scan_id", Integer, nullable=False),
    Column("name", Text, nullable=False),
    Column("person_id", Text, nullable=False),  # '' when the recognizer gave no id
    Column("videos", BigInteger, nullable=False),
    PrimaryKeyConstraint("scan_id", "name", "person_id", name="pk_person_videos"),
)

person_images = Table(
    "person_images",
    metadata,
    # How many images of a scan each person was found in, kept by the write that stores the faces
    # (worker/person_counts.py), so `celebscan people` reads a row per person, not every face.
    Column("scan_id", Integer, nullable=False),
    Column("name", Text, nullable=False),
    Column("person_id", Text, nullable=False),  # '' when the recognizer gave no id
    Column("images", BigInteger, nullable=False),
    PrimaryKeyConstraint("scan_id", "name", "person_id", name="pk_person_images"),
)

people = Table(
    "people",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("external_id", Text),
    Column("urls", JSON),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

gallery_faces = Table(
    "gallery_faces",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("person_id", Integer, ForeignKey("people.id", ondelete="CASCADE"), nullable=False),
    Column("embedding", LargeBinary, nullable=False),
    #: The EmbeddingModel id that made the embedding (worker/faces/models.py): never compared across models.
    Column("model", Text),
    #: The face and half its size around it, a small JPEG: what a later model re-embeds from.
    Column("face_crop", LargeBinary),
    Column("source", Text, nullable=False),
    Column("image_hash", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("person_id", "image_hash", name="uq_gallery_person_image"),
)
