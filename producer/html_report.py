"""One self-contained HTML page of a scan: the people found, a few annotated pictures of each, filterable.

A video is shown by its frame in which the person seen longest matched best, and a timeline of
when each person appears (an inline SVG: a row per person, a bar per time range).

The page is bounded whatever the scan's size: every person found with their image count, at most
``per_person`` pictures of each (and of images in which nobody was recognized), the first failures
and their counts by code (see :func:`gather`).

The page carries its thumbnails as ``data:`` URIs, its style and a few lines of script inline, and
a Content-Security-Policy that forbids any fetch, so it can be mailed or opened offline. The person
filter is also driven by the address (``report.html#person=NAME``), so a link can share a view.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from producer.annotate import annotate, jpeg_bytes
from worker.errors import CelebscanError
from worker.findings import PersonFound
from worker.media.images import ImageLimits, decode_image
from worker.read_models import ResultRecord, ScanSummary
from worker.sources import ObjectReader, Source
from worker.store import ResultStore

THUMBNAIL_SIDE = 360


def read_picture(
    record: ResultRecord, readers: dict[str, ObjectReader], limits: ImageLimits | None = None
) -> Image.Image:
    """The record's image, decoded and upright, read from where the scan found it."""
    source = Source.from_url(record.source)
    loaded = decode_image(readers[source.kind].read(source.bucket, record.key), limits or ImageLimits())
    return Image.fromarray(loaded.pixels)


def read_frame(record: ResultRecord, readers: dict[str, ObjectReader], seconds: float) -> Image.Image:
    """The frame of the record's video at ``seconds`` (the first at or after it), read by ranges."""
    from worker.media.video import sample_frames

    source = Source.from_url(record.source)
    ranges = readers[source.kind].ranges(source.bucket, record.key, record.etag)  # type: ignore[attr-defined]
    try:
        frame = next(iter(sample_frames(ranges, 1.0, round(seconds * 1000), max_side=2 * THUMBNAIL_SIDE)), None)
    finally:
        ranges.close()
    if frame is None:
        raise CelebscanError(f"the video has no frame at {seconds:.1f} s", code="CorruptVideo")
    return Image.fromarray(frame.pixels)


def annotated(record: ResultRecord, readers: dict[str, ObjectReader], max_side: int | None = None) -> Image.Image:
    """The record's picture with its faces drawn; a video's frame in which the person seen longest
    matched best, with the faces of that frame (its first frame when nobody was recognized)."""
    if not record.is_video:
        return annotate(read_picture(record, readers), record, max_side=max_side)
    if not record.appearances:
        return annotate(read_frame(record, readers, 0.0), record, max_side=max_side)
    shown = max(record.appearances, key=lambda a: (a.seconds, a.match_confidence))
    pairs = zip(record.appearances, record.celebrities, strict=True)
    framed = dataclasses.replace(
        record, celebrities=tuple(c for a, c in pairs if a.frame_seconds == shown.frame_seconds)
    )
    return annotate(read_frame(record, readers, shown.frame_seconds), framed, max_side=max_side)


def thumbnail(record: ResultRecord, readers: dict[str, ObjectReader]) -> tuple[bytes | None, str]:
    """(annotated JPEG thumbnail, or None and why not) of a done image or video (:func:`annotated`)."""
    try:
        picture = annotated(record, readers, max_side=THUMBNAIL_SIDE)
    except CelebscanError as exc:
        return None, f"{'video' if record.is_video else 'image'} not available now: {exc.code}: {exc}"
    return jpeg_bytes(picture, quality=75), ""


def timeline(record: ResultRecord) -> str:
    """An inline SVG of a video's appearances: a row per person (named in its first quarter), a bar
    per time range over the rest."""
    duration = record.duration_seconds or max((end for a in record.appearances for _, end in a.ranges), default=0.0)
    if not record.appearances or duration <= 0:
        return ""
    row = 14
    bars = []
    for number, appearance in enumerate(record.appearances):
        y = number * row
        for start, end in appearance.ranges:
            x, width = 25 + 75 * start / duration, max(0.6, 75 * (end - start) / duration)
            tip = html.escape(f"{appearance.name}: {start:.1f}–{end:.1f} s")
            bars.append(
                f'<rect x="{x:.2f}%" y="{y + 2}" width="{width:.2f}%" height="{row - 4}" rx="2"><title>{tip}</title></rect>'
            )
        bars.append(f'<text x="0" y="{y + row - 3}">{html.escape(appearance.name)}</text>')
    height = row * len(record.appearances)
    return (
        f'<svg class=timeline width="100%" height="{height}" role="img" '
        f'aria-label="when each person appears in {html.escape(record.key)} ({duration:.1f} s)">{"".join(bars)}</svg>'
        f"<div class=axis><span>0 s</span><span>{duration:.1f} s</span></div>"
    )


#: Failures listed by name on the page (all of them are counted by code).
FAILURES_SHOWN = 200
#: People shown with pictures, most images first; every person found is listed with their count.
PEOPLE_PICTURED = 200
#: Images read to find ones in which nobody was recognized, per picture wanted.
NOBODY_LOOKAHEAD = 20


#: Unnamed people shown (most pictures first), each with a few of its faces.
UNKNOWN_SHOWN = 24
FACE_SIDE = 96


@dataclass(frozen=True)
class FaceSample:
    """A face to show cut out of its picture."""

    source: str
    key: str
    box: tuple[float, float, float, float]  # left, top, width, height (ratios)


@dataclass(frozen=True)
class UnknownGroup:
    id: int
    images: int
    faces: list[FaceSample]


@dataclass(frozen=True)
class ReportContent:
    """What a page shows, bounded whatever the scan's size: the people found with their counts, a
    few pictures of each, a few in which nobody was recognized, and the first failures."""

    summary: ScanSummary
    people: list[PersonFound]
    pictures: list[ResultRecord]
    failures: list[ResultRecord]
    per_person: int
    unknown: list[UnknownGroup] = field(default_factory=list)
    #: What ``find`` found for the face of a photo (``report --find``): its line, and the pictures.
    found_heading: str = ""
    found: list[ResultRecord] = field(default_factory=list)


def gather(
    store: ResultStore,
    summary: ScanSummary,
    per_person: int,
    persons: Sequence[str] = (),
    include_deleted: bool = False,
) -> ReportContent:
    """Read what the page of ``summary``'s scan shows: ``per_person`` pictures of each person found
    (of ``persons`` only, when given), each picture once, and for everyone also as many pictures
    in which nobody was recognized; every query reads by index, so a scan of millions takes as long
    as one of hundreds. Images of deleted objects (a followed bucket's) only with ``include_deleted``."""
    everyone = store.people(summary.id, include_deleted=include_deleted)
    people = [p for p in everyone if not persons or p.name in persons or p.person_id in persons]
    pictures: dict[str, ResultRecord] = {}
    for person in people[:PEOPLE_PICTURED]:  # a few queries each: the most found only (all are counted)
        chosen = [person.person_id or person.name]
        for record in store.result_records(
            summary.id, persons=chosen, limit=per_person, include_deleted=include_deleted
        ):
            pictures.setdefault(record.key, record)
    failures: list[ResultRecord] = []
    if not persons:
        nobody = 0
        lookahead = per_person * NOBODY_LOOKAHEAD
        for record in store.result_records(summary.id, limit=lookahead, include_deleted=include_deleted):
            if record.error is not None:
                if len(failures) < FAILURES_SHOWN:
                    failures.append(record)
            elif not record.celebrities and nobody < per_person:
                pictures.setdefault(record.key, record)
                nobody += 1
    return ReportContent(summary, people, list(pictures.values()), failures, per_person, _unknown(store))


def _unknown(store: ResultStore) -> list[UnknownGroup]:
    """The unnamed people (as last grouped: ``people --unknown``, ``faces group``), a few faces each."""
    from worker.faces.search import stored_face_rows
    from worker.faces.unknown import unknown_people_found

    groups = []
    for person in unknown_people_found(store.engine, UNKNOWN_SHOWN):
        rows = stored_face_rows(store.engine, list(person.sample_faces))
        samples = [
            FaceSample(row.source, row.key, (row.box_left, row.box_top, row.box_width, row.box_height)) for row in rows
        ]
        groups.append(UnknownGroup(person.id, person.images, samples))
    return groups


def render(
    content: ReportContent, readers: dict[str, ObjectReader], progress: Callable[[], None] = lambda: None
) -> str:
    """The page: each picture read, annotated and embedded (``progress`` is called per picture)."""
    figures = []
    for record in content.pictures:
        figures.append(_figure(record, record.names, *thumbnail(record, readers)))
        progress()
    options = "".join(
        f'<option value="{html.escape(name)}" data-images="{count}">{html.escape(name)} ({count})</option>'
        for name, count in _images_by_name(content.people).items()
    )
    summary = content.summary
    counts = summary.counts
    note = (
        f"<p class=note>Showing at most {content.per_person} pictures of each person "
        f"(<code>celebscan report --per-person N</code>, or <code>--person NAME</code> for one person); "
        f"<code>celebscan results --person NAME</code> lists them all.</p>"
    )
    return _PAGE.format(
        unknown=_unknown_html(content.unknown, readers),
        found=_found_html(content, readers),
        title=html.escape(f"celebscan scan {summary.id}: {summary.source}"),
        summary=html.escape(
            f"{summary.listed} images listed"
            + (f" ({sum(summary.videos.values())} of them videos)" if summary.videos else "")
            + f", {counts['done']} done, {counts['failed']} failed, "
            f"{summary.faces} faces, {len(content.people)} people, backend {summary.backend}"
        ),
        options=options,
        figures="".join(figures),
        truncated=note,
        failures=_failures_html(summary, content.failures),
    )


def _unknown_html(groups: list[UnknownGroup], readers: dict[str, ObjectReader]) -> str:
    if not groups:
        return ""
    sections = []
    for group in groups:
        crops = "".join(_face_crop(sample, readers) for sample in group.faces)
        sections.append(
            f"<div class=unknown><b>unknown {group.id}</b>: {group.images} picture{'s' if group.images != 1 else ''}"
            f"<div>{crops}</div></div>"
        )
    return (
        "<h2 id=unknown>Unnamed people</h2><p class=note>Unrecognized faces alike enough to be one person: "
        "<code>celebscan people name N NAME</code> enrolls one and names all its faces.</p>" + "".join(sections)
    )


def _face_crop(sample: FaceSample, readers: dict[str, ObjectReader]) -> str:
    source = Source.from_url(sample.source)
    try:
        picture = decode_image(readers[source.kind].read(source.bucket, sample.key), ImageLimits())
    except CelebscanError:
        return "<span class=missing>?</span>"
    left, top, width, height = sample.box
    box = (
        round(left * picture.width),
        round(top * picture.height),
        round((left + width) * picture.width),
        round((top + height) * picture.height),
    )
    face = Image.fromarray(picture.pixels).crop(box)
    face.thumbnail((FACE_SIDE, FACE_SIDE))
    encoded = base64.b64encode(jpeg_bytes(face, quality=80)).decode()
    return f'<img class=face alt="{html.escape(sample.key)}" src="data:image/jpeg;base64,{encoded}">'


def _found_html(content: ReportContent, readers: dict[str, ObjectReader]) -> str:
    if not content.found_heading:
        return ""
    figures = "".join(_figure(record, record.names, *thumbnail(record, readers)) for record in content.found)
    return f"<h2 id=found>{html.escape(content.found_heading)}</h2><div class=grid>{figures}</div>"


def _images_by_name(people: list[PersonFound]) -> dict[str, int]:
    """Images per name, most first (people who share a name are one entry of the filter)."""
    by_name: dict[str, int] = {}
    for person in people:
        by_name[person.name] = by_name.get(person.name, 0) + person.images
    return dict(sorted(by_name.items(), key=lambda item: (-item[1], item[0])))


def _failures_html(summary: ScanSummary, failures: list[ResultRecord]) -> str:
    failed = summary.counts["failed"]
    if not failed:
        return "<h2 id=failures>No failures</h2>"
    codes = ", ".join(f"{html.escape(code)} {count}" for code, count in sorted(summary.failures.items()))
    rows = "".join(
        f"<tr><td>{html.escape(r.key)}</td><td><code>{html.escape(r.error.code)}</code></td>"
        f"<td>{html.escape(r.error.message)}</td></tr>"
        for r in failures
        if r.error is not None
    )
    more = (
        f"<p class=note>The first {len(failures)} of {failed}: "
        f"<code>celebscan results --scan {summary.id} --format csv</code> lists them all.</p>"
        if failed > len(failures)
        else ""
    )
    return (
        f"<h2 id=failures>Could not be read ({failed}: {codes})</h2>"
        f"<table><tr><th>image</th><th>code</th><th>reason</th></tr>{rows}</table>{more}"
    )


def _figure(record: ResultRecord, names: list[str], picture_bytes: bytes | None, problem: str) -> str:
    found = ", ".join(f"{html.escape(c.name)} ({c.match_confidence:.0f})" for c in record.celebrities)
    unknown = len(record.unrecognized_faces)
    caption = found or "nobody recognized"
    if unknown:
        caption += f"; {unknown} unrecognized face{'s' if unknown != 1 else ''}"
    if picture_bytes:
        encoded = base64.b64encode(picture_bytes).decode()
        picture = f'<img alt="{html.escape(record.key)}" src="data:image/jpeg;base64,{encoded}">'
    else:
        picture = f"<div class=missing>{html.escape(problem or 'no picture')}</div>"
    people = html.escape(json.dumps(names))
    if record.is_video:
        length = f" ({record.duration_seconds:.1f} s)" if record.duration_seconds is not None else ""
        seen = ", ".join(
            f"{html.escape(a.name)} ({a.match_confidence:.0f}, {a.seconds:.1f} s)" for a in record.appearances
        )
        caption = f"video{length}: {seen or 'nobody recognized'}"
        picture += timeline(record)
    return (
        f"<figure data-people='{people}'>{picture}<figcaption><b>{html.escape(record.key)}</b>"
        f"<br>{caption}</figcaption></figure>"
    )


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }}
header {{ display: flex; flex-wrap: wrap; gap: 1em; align-items: baseline; }}
#gallery {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }}
figure {{ margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5em; }}
figure[hidden] {{ display: none; }}
img {{ width: 100%; height: auto; display: block; }}
figcaption {{ font-size: .9em; margin-top: .4em; overflow-wrap: anywhere; }}
.missing {{ padding: 2em 1em; background: #eee; color: #666; }}
svg.timeline {{ display: block; margin-top: .4em; font-size: 10px; }}
svg.timeline rect {{ fill: #28c85a; }} svg.timeline text {{ fill: #333; }}
.axis {{ display: flex; justify-content: space-between; font-size: .75em; color: #888; margin-left: 25%; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: .3em .6em; text-align: left; }}
.note {{ color: #666; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }}
.unknown {{ margin: .6em 0; }} img.face {{ width: auto; display: inline-block; margin: .2em; border-radius: 4px; }}
</style></head>
<body>
<header><h1>{title}</h1><p id=summary>{summary}</p>
<label>Person: <select id=person><option value="">everyone</option>{options}</select></label>
<span id=count></span></header>
{truncated}
<main id=gallery>{figures}</main>
{found}
{unknown}
{failures}
<script>
const select = document.getElementById("person");
function show(person) {{
  let visible = 0;
  for (const figure of document.querySelectorAll("#gallery figure")) {{
    const match = !person || JSON.parse(figure.dataset.people).includes(person);
    figure.hidden = !match;
    visible += match;
  }}
  const option = select.selectedOptions[0];
  const total = person && option ? Number(option.dataset.images) : visible;
  document.getElementById("count").textContent =
    total + " image" + (total === 1 ? "" : "s") + (total > visible ? ", " + visible + " shown" : "");
}}
function fromAddress() {{
  const person = new URLSearchParams(location.hash.slice(1)).get("person") || "";
  select.value = person;
  show(person);
}}
select.addEventListener("change", () => {{ location.hash = select.value ? "person=" + encodeURIComponent(select.value) : ""; show(select.value); }});
window.addEventListener("hashchange", fromAddress);
fromAddress();
</script>
</body></html>
"""
