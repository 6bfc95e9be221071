"""One self-contained HTML page of a scan: every image as an annotated thumbnail, filterable by person.

The page carries its thumbnails as ``data:`` URIs, its style and a few lines of script inline, and
a Content-Security-Policy that forbids any fetch, so it can be mailed or opened offline. The person
filter is also driven by the address (``report.html#person=NAME``), so a link can share a view.
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from collections.abc import Callable, Iterable

from PIL import Image

from producer.annotate import annotate, jpeg_bytes
from worker.errors import CelebscanError
from worker.images import ImageLimits, decode_image
from worker.reports import ResultRecord, ScanSummary
from worker.sources import ObjectReader, Source

THUMBNAIL_SIDE = 360


def read_picture(
    record: ResultRecord, readers: dict[str, ObjectReader], limits: ImageLimits | None = None
) -> Image.Image:
    """The record's image, decoded and upright, read from where the scan found it."""
    source = Source.from_url(record.source)
    loaded = decode_image(readers[source.kind].read(source.bucket, record.key), limits or ImageLimits())
    return Image.fromarray(loaded.pixels)


def thumbnail(record: ResultRecord, readers: dict[str, ObjectReader]) -> tuple[bytes | None, str]:
    """(annotated JPEG thumbnail, or None and why not) of a done image."""
    try:
        picture = annotate(read_picture(record, readers), record, max_side=THUMBNAIL_SIDE)
    except CelebscanError as exc:
        return None, f"image not available now: {exc.code}: {exc}"
    return jpeg_bytes(picture, quality=75), ""


def render(
    summary: ScanSummary,
    records: Iterable[ResultRecord],
    readers: dict[str, ObjectReader],
    limit: int,
    progress: Callable[[], None] = lambda: None,
) -> str:
    """The page; images past ``limit`` are counted (and their people listed) but not shown or read."""
    shown: list[str] = []
    failures: list[ResultRecord] = []
    people: Counter[str] = Counter()
    total = 0
    for record in records:
        progress()
        if record.error is not None:
            failures.append(record)
            continue
        total += 1
        names = record.names
        people.update(names)
        if len(shown) < limit:
            shown.append(_figure(record, names, *thumbnail(record, readers)))
    truncated = f"<p class=note>Showing the first {limit} of {total} images.</p>" if total > limit else ""
    options = "".join(
        f'<option value="{html.escape(name)}">{html.escape(name)} ({count})</option>'
        for name, count in sorted(people.items())
    )
    failure_rows = "".join(
        f"<tr><td>{html.escape(r.key)}</td><td><code>{html.escape(r.error.code)}</code></td>"
        f"<td>{html.escape(r.error.message)}</td></tr>"
        for r in failures
        if r.error is not None
    )
    failures_html = (
        f"<h2 id=failures>Could not be read ({len(failures)})</h2><table><tr><th>image</th><th>code</th>"
        f"<th>reason</th></tr>{failure_rows}</table>"
        if failures
        else "<h2 id=failures>No failures</h2>"
    )
    title = f"celebscan scan {summary.id}: {summary.source}"
    counts = summary.counts
    return _PAGE.format(
        title=html.escape(title),
        summary=html.escape(
            f"{summary.listed} images listed, {counts['done']} done, {counts['failed']} failed, "
            f"{summary.faces} faces, backend {summary.backend}"
        ),
        options=options,
        figures="".join(shown),
        truncated=truncated,
        failures=failures_html,
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
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: .3em .6em; text-align: left; }}
.note {{ color: #666; }}
</style></head>
<body>
<header><h1>{title}</h1><p id=summary>{summary}</p>
<label>Person: <select id=person><option value="">everyone</option>{options}</select></label>
<span id=count></span></header>
{truncated}
<main id=gallery>{figures}</main>
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
  document.getElementById("count").textContent = visible + " image" + (visible === 1 ? "" : "s");
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
