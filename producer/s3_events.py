"""S3 Event Notifications, as an SQS message body brings them: what happened to which object.

The first piece of following a living bucket (``celebscan follow``, issue 21, still to come): a
message is S3's own notification (``{"Records": [...]}``), or the same wrapped by SNS (its
``Message`` holds S3's JSON as a string), or an EventBridge event (``detail-type`` "Object
Created" / "Object Deleted"). S3 URL-encodes keys in its own notifications (a space as ``+``);
EventBridge sends them as they are. ``s3:TestEvent``, sent when a notification is configured, is
no event. An overwrite's or a delete's notifications may arrive out of order: the ``sequencer`` of
two events of one key tells which came last (:func:`later`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote_plus

from worker.schema import CREATED, REMOVED


class MalformedEventError(ValueError):
    """A message that is not an S3 event notification celebscan can read (left to the queue's
    redrive policy, never dropped)."""


@dataclass(frozen=True)
class ObjectEvent:
    kind: str  # CREATED or REMOVED
    bucket: str
    key: str  # decoded: the object's real name
    sequencer: str  # hexadecimal, ordered per key (see later()); "" when the sender gave none (moto)
    etag: str | None = None  # created objects only
    size: int | None = None
    time: str = ""  # when S3 says it happened (ISO 8601)
    #: A versioned bucket's permanent deletion of one version (``ObjectRemoved:Delete`` with a
    #: version id, "null" too): the key may still hold another, current version, which only S3 can tell.
    one_version: bool = False


def parse_message(body: str | bytes) -> list[ObjectEvent]:
    """The object events in one SQS message body (none for a test event)."""
    try:
        message = json.loads(body)
    except (TypeError, ValueError) as exc:
        raise MalformedEventError(f"not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise MalformedEventError("not a JSON object")
    if message.get("Type") == "Notification" and isinstance(message.get("Message"), str):  # through SNS
        return parse_message(message["Message"])
    if message.get("Event") == "s3:TestEvent":
        return []
    if message.get("source") == "aws.s3" and "detail" in message:
        return _from_eventbridge(message)
    records = message.get("Records")
    if not isinstance(records, list):
        raise MalformedEventError("neither S3 notification records, an SNS notification nor an EventBridge event")
    return [event for record in records if (event := _from_record(record)) is not None]


def _from_record(record: Any) -> ObjectEvent | None:
    try:
        kind = _kind(str(record["eventName"]).removeprefix("s3:"))
        if kind is None:
            return None  # restore, replication, lifecycle transition...: nothing to recognize
        s3 = record["s3"]
        thing = s3["object"]
        key = unquote_plus(str(thing["key"]))  # S3's own notifications URL-encode keys
        event = _event(kind, s3["bucket"]["name"], key, thing, thing.get("eTag"), record.get("eventTime", ""))
        one_version = str(record["eventName"]).removeprefix("s3:") == "ObjectRemoved:Delete"
        return replace(event, one_version=True) if one_version and _versioned(thing.get("versionId")) else event
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedEventError(f"an S3 record without {exc}") from exc


def _from_eventbridge(message: dict) -> list[ObjectEvent]:
    kind = {"Object Created": CREATED, "Object Deleted": REMOVED}.get(str(message.get("detail-type")))
    if kind is None:
        return []
    try:
        detail = message["detail"]
        thing = detail["object"]
        key = str(thing["key"])  # EventBridge sends keys as they are
        event = _event(kind, detail["bucket"]["name"], key, thing, thing.get("etag"), message.get("time", ""))
        one_version = detail.get("deletion-type") == "Permanently Deleted" and _versioned(thing.get("version-id"))
        return [replace(event, one_version=True) if kind == REMOVED and one_version else event]
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedEventError(f"an EventBridge S3 event without {exc}") from exc


def _event(kind: str, bucket: Any, key: str, thing: dict, etag: Any, time: Any) -> ObjectEvent:
    """An event from the fields both shapes share (an object's ETag and size only when created)."""
    created = kind == CREATED
    return ObjectEvent(
        kind=kind,
        bucket=str(bucket),
        key=key,
        sequencer=str(thing.get("sequencer", "")),
        etag=etag if created else None,
        size=int(thing["size"]) if created and "size" in thing else None,
        time=str(time),
    )


def _versioned(version_id: Any) -> bool:
    """A version id: the bucket is (or was) versioned. "null" counts: the version of an object
    written before versioning was enabled, or while it was suspended, may be one of several."""
    return isinstance(version_id, str) and version_id != ""


def _kind(event_name: str) -> str | None:
    if event_name.startswith("ObjectCreated:"):
        return CREATED
    if event_name.startswith("ObjectRemoved:"):
        return REMOVED
    return None


def later(first: ObjectEvent, second: ObjectEvent) -> ObjectEvent:
    """Of two events of one object, the one that happened last: S3 says to compare sequencers as
    hexadecimal strings after padding the shorter with zeros on the right."""
    width = max(len(first.sequencer), len(second.sequencer))
    return second if _padded(second, width) > _padded(first, width) else first


def _padded(event: ObjectEvent, width: int) -> str:
    return event.sequencer.upper().ljust(width, "0")
