"""The local recognizer and the gallery on real photos with the real dlib models."""

import numpy as np
import pytest

from worker.database import connect
from worker.errors import GalleryError
from worker.faces.gallery import Gallery
from worker.media.images import decode_image
from worker.recognizers.local import LocalRecognizer, match_confidence

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
    assert index.embeddings.shape == (sum(photos.values()), 128)


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


@pytest.mark.parametrize("package", ["dlib", "face_recognition_models", "threadpoolctl"])
def test_a_missing_dependency_names_the_install_command(monkeypatch, package):
    import sys

    from worker.errors import MissingDependencyError
    from worker.faces.embeddings import FaceEmbedder

    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(
        MissingDependencyError, match=rf"{package} is missing.*pip install '\.\[local\]' in a clone of celebscan"
    ):
        FaceEmbedder()
