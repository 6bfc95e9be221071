"""The commands of the faces remembered: ``find``, ``faces`` (erase, relabel, group) and the
unnamed people under ``people`` (``--unknown``, ``name``, ``merge``, ``take-out``, ``faces``)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import click
from sqlalchemy import select

from producer.cli import App, CelebscanGroup, _plural
from worker.faces.models import current_model
from worker.schema import faces as face_rows
from worker.schema import images

FIND_FORMATS = ("text", "jsonl", "csv")


def _index(app: App):
    from worker.faces.index import FaceIndex

    index = FaceIndex(app.store.engine, current_model(app.settings), app.settings.face_index_dir)
    refreshed = index.refresh()
    if refreshed.added or refreshed.removed:
        click.echo(
            f"face index: {len(index):,} faces ({refreshed.added:,} added, {refreshed.removed:,} removed,"
            f" {refreshed.seconds:.1f} s)",
            err=True,
        )
    return index


@click.command()
@click.argument("photo")
@click.option(
    "--face",
    "face_number",
    type=click.IntRange(min=1),
    help="The face to look for when there are several (1 = largest).",
)
@click.option("--limit", type=click.IntRange(min=1), help="Only the N nearest pictures.")
@click.option("--format", "fmt", type=click.Choice(FIND_FORMATS), default="text", show_default=True)
@click.pass_obj
def find(app: App, photo: str, face_number: int | None, limit: int | None, fmt: str) -> None:
    """Every picture with the face in PHOTO (a file, or an s3:// key), nearest first, from the
    faces remembered: no picture is read again."""
    sightings = sightings_of(app, photo, face_number, limit)
    if fmt == "jsonl":
        for sighting in sightings:
            click.echo(json.dumps(sighting.to_dict()))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["location", "distance", "confidence", "name", "unknown", "face_id"])
        for s in sightings:
            writer.writerow(
                [s.location, f"{s.distance:.4f}", f"{s.confidence:.1f}", s.name or "", s.unknown_id or "", s.face_id]
            )
    else:
        if not sightings:
            click.echo("no stored face is within the threshold of that face")
        for s in sightings:
            who = s.name or (f"unknown {s.unknown_id}" if s.unknown_id else "unknown")
            click.echo(f"{s.distance:.3f}  {s.confidence:5.1f}  {s.location}  ({who})")


def sightings_of(app: App, photo: str, face_number: int | None, limit: int | None):
    """What ``find`` finds for a face of PHOTO (a file or an s3:// key), nearest first."""
    from producer.cli import _embedder
    from worker.faces.search import faces_in_photo, pick_face
    from worker.faces.search import find as find_face
    from worker.sources import build_readers, parse_source

    if photo.startswith("s3://"):
        source = parse_source(photo)
        data = build_readers(app.settings)["s3"].read(source.bucket, source.prefix)
    else:
        path = Path(photo)
        if not path.is_file():
            raise click.ClickException(f"no such file: {photo}")
        data = path.read_bytes()
    found, _, _ = faces_in_photo(data, _embedder(app.settings))
    face = pick_face(found, face_number)
    return find_face(app.store.engine, _index(app), current_model(app.settings), face.embedding, limit)


@click.group(cls=CelebscanGroup)
def faces() -> None:
    """The faces remembered: their embeddings (biometric data), erasing them, naming them again."""


@faces.command("erase")
@click.option("--person", help="Every face named NAME, and NAME's enrollment in the gallery.")
@click.option("--key", help="Every face of the picture KEY (every scan of it).")
@click.option("--unknown", "group", type=int, help="Every face of the unnamed person N.")
@click.option("--all", "everything", is_flag=True, help="Every embedding stored.")
@click.pass_obj
def faces_erase(app: App, person: str | None, key: str | None, group: int | None, everything: bool) -> None:
    """Erase stored face embeddings from the database and from this machine's face index (the
    faces' boxes and names stay; other machines' indexes drop them at their next refresh)."""
    from worker.faces import removals
    from worker.faces.gallery import Gallery

    chosen = [option for option in (person, key, group) if option is not None] + ([True] if everything else [])
    if len(chosen) != 1:
        raise click.UsageError("name exactly one of --person, --key, --unknown or --all")
    if person is not None:
        condition = face_rows.c.name == person
    elif key is not None:
        condition = face_rows.c.image_id.in_(select(images.c.id).where(images.c.key == key))
    elif group is not None:
        condition = face_rows.c.unknown_id == group
    else:
        condition = face_rows.c.id.is_not(None)
    with app.store.engine.begin() as conn:
        erased = removals.forget(conn, condition)
    enrolled = ""
    if person is not None and any(name == person for name, _ in Gallery(app.store.engine).people()):
        Gallery(app.store.engine).remove(person)
        enrolled = f"; {person}'s enrollment removed from the gallery"
    _index(app)
    click.echo(f"erased {_plural(erased, 'face embedding')}{enrolled}")


@faces.command("relabel")
@click.pass_obj
def faces_relabel(app: App) -> None:
    """Match every stored face the gallery may name against the gallery again (after changing
    CELEBSCAN_MATCH_THRESHOLD); count the faces an older face model stored, which are left aside."""
    from worker.faces import stored
    from worker.faces.labelling import Labeller

    labeller = Labeller(app.store.engine, app.settings)
    labelled = labeller.everyone()
    click.echo(f"stored faces matched again: {labelled.looked_at:,}; names changed: {labelled.changed:,}")
    for model, count in stored.models(app.store.engine):
        if model != labeller.model.id:
            click.echo(
                f"left aside: {_plural(count, 'face')} embedded by the older face model {model}"
                " (`celebscan scan --force SOURCE` embeds them again)"
            )


@faces.command("group")
@click.pass_obj
def faces_group(app: App) -> None:
    """Group the unrecognized faces not grouped yet into unnamed people (`people --unknown` does too)."""
    click.echo(_group(app))


def _group(app: App) -> str:
    from worker.faces.grouping import Grouping

    settings = app.settings
    grouping = Grouping(
        app.store.engine,
        _index(app),
        current_model(settings),
        settings.unknown_min_faces,
    )
    done = grouping.run()
    return (
        f"unrecognized faces looked at: {done.looked_at:,}; grouped: {done.grouped:,}"
        f" ({_plural(done.new_groups, 'new unnamed person', 'new unnamed people')}); left ungrouped: {done.deferred:,}"
    )


def list_unknown(app: App, limit: int | None, fmt: str) -> None:
    from worker.faces.unknown import unknown_people_found

    click.echo(_group(app), err=True)
    found = unknown_people_found(app.store.engine, limit)
    if fmt == "jsonl":
        for person in found:
            click.echo(
                json.dumps(
                    {
                        "unknown": person.id,
                        "images": person.images,
                        "faces": person.faces,
                        "sample_faces": list(person.sample_faces),
                    }
                )
            )
        return
    if not found:
        click.echo("no unnamed people yet")
    for person in found:
        click.echo(f"unknown {person.id}: {_plural(person.images, 'picture')}")


@click.command("name")
@click.argument("group", type=int)
@click.argument("name")
@click.pass_obj
def people_name(app: App, group: int, name: str) -> None:
    """Name the unnamed person GROUP: enroll them as NAME and name all their faces."""
    from worker.faces.labelling import Labeller
    from worker.faces.unknown import name_group

    enrolled, named = name_group(app.store.engine, current_model(app.settings), group, name)
    labelled = Labeller(app.store.engine, app.settings).after_enrolling([name])
    click.echo(
        f"unknown {group} is {name}: {_plural(enrolled, 'face')} enrolled, {_plural(named, 'face')} named,"
        f" {labelled.changed:,} more stored faces named from the gallery"
    )


@click.command("merge")
@click.argument("source", type=int)
@click.argument("into", type=int)
@click.pass_obj
def people_merge(app: App, source: int, into: int) -> None:
    """Merge the unnamed person SOURCE into INTO (one person seen as two)."""
    from worker.faces.unknown import merge

    moved = merge(app.store.engine, source, into)
    click.echo(f"unknown {source} merged into unknown {into}: {_plural(moved, 'face')} moved")


@click.command("take-out")
@click.argument("face_ids", nargs=-1, type=int, required=True)
@click.pass_obj
def people_take_out(app: App, face_ids: tuple[int, ...]) -> None:
    """Take the faces FACE_IDS out of their unnamed person (never grouped again)."""
    from worker.queue.labels import FaceLabels

    taken = FaceLabels(app.store.engine).take_out(face_ids)
    click.echo(f"taken out: {_plural(taken, 'face')}")


@click.command("faces")
@click.argument("group", type=int)
@click.pass_obj
def people_faces(app: App, group: int) -> None:
    """The faces of the unnamed person GROUP: face id and picture (for take-out)."""
    from worker.faces.unknown import group_faces

    for face_id, image_id in group_faces(app.store.engine, group):
        key = app.store.engine.connect().execute(select(images.c.key).where(images.c.id == image_id)).scalar()
        click.echo(f"{face_id}\t{key}")


PEOPLE_COMMANDS = (people_name, people_merge, people_take_out, people_faces)
