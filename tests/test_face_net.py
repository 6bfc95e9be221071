"""The numpy face descriptor network gives dlib's own descriptors, from dlib's own model file."""

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image
from skimage import data as skimage_data

from tests.conftest import FACES_DEV
from worker.faces.embeddings import DESCRIPTOR_MODEL, LANDMARKS_MODEL, model_file
from worker.faces.net import CHIP_PADDING, CHIP_SIZE, CHIPS_AT_ONCE, FaceDescriptorNet, ModelFormatError

dlib = pytest.importorskip("dlib", reason="the local recognizer's extra is not installed")
DESCRIPTOR_MODEL_FILE = model_file(DESCRIPTOR_MODEL)
LANDMARKS_MODEL_FILE = str(model_file(LANDMARKS_MODEL))


@pytest.fixture(scope="module")
def net():
    return FaceDescriptorNet(str(DESCRIPTOR_MODEL_FILE))


@pytest.fixture(scope="module")
def dlib_faces():
    """(image, landmarks) of every face dlib finds in two bundled photos and five faces-dev photos."""
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        images = [np.asarray(Image.open(handle).convert("RGB")), skimage_data.astronaut()]
    if FACES_DEV.is_dir():
        images += [np.asarray(Image.open(path).convert("RGB")) for path in sorted((FACES_DEV / "test").iterdir())[:5]]
    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(LANDMARKS_MODEL_FILE)
    found = [(image, landmarks(image, box)) for image in images for box in detector(image, 1)]
    assert len(found) >= len(images)
    return found


def test_descriptors_equal_dlibs_own(net, dlib_faces):
    dlib_net = dlib.face_recognition_model_v1(str(DESCRIPTOR_MODEL_FILE))
    for image, shape in dlib_faces:
        expected = np.array(dlib_net.compute_face_descriptor(image, shape))
        chip = dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
        ours = net.descriptors(chip[None])[0]
        assert ours.shape == (128,)
        np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_a_batch_of_chips_gives_each_chip_its_own_descriptor(net, dlib_faces):
    faces = [dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=CHIP_PADDING) for image, shape in dlib_faces]
    chips = np.stack((faces * CHIPS_AT_ONCE)[: CHIPS_AT_ONCE * 2 + 3])  # more than one pass through the network
    one_by_one = np.concatenate([net.descriptors(chip[None]) for chip in chips])
    np.testing.assert_allclose(net.descriptors(chips), one_by_one, atol=1e-5)
    assert np.linalg.norm(one_by_one[0] - one_by_one[1]) > 0.3  # different people, different vectors


def test_another_dlib_model_is_refused():
    with pytest.raises(ModelFormatError, match="not dlib_face_recognition_resnet_model_v1"):
        FaceDescriptorNet(LANDMARKS_MODEL_FILE)


def test_chips_of_the_wrong_size_are_refused(net):
    with pytest.raises(ValueError, match="150, 150, 3"):
        net.descriptors(np.zeros((1, 100, 100, 3), dtype=np.uint8))


def test_the_detector_cache_is_written_once_then_read_instead_of_parsing(tmp_path, monkeypatch):
    from worker.faces.embeddings import FaceEmbedder

    image = skimage_data.astronaut()
    first = FaceEmbedder(cache_dir=tmp_path / "cache")
    assert [path.suffix for path in (tmp_path / "cache").iterdir()] == [".svm"]

    def parse_again():
        raise AssertionError("the detector was parsed again instead of read from the cache")

    monkeypatch.setattr(dlib, "get_frontal_face_detector", parse_again)
    second = FaceEmbedder(cache_dir=tmp_path / "cache")
    assert second.detect(image) and [(str(box), score) for box, score in second.detect(image)] == [
        (str(box), score) for box, score in first.detect(image)
    ]


def test_a_cache_that_cannot_be_written_costs_only_time(tmp_path):
    from worker.faces.embeddings import FaceEmbedder

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert FaceEmbedder(cache_dir=not_a_folder / "cache").detect(skimage_data.astronaut())


def test_a_damaged_cache_file_is_replaced(tmp_path):
    from worker.faces.embeddings import FaceEmbedder

    FaceEmbedder(cache_dir=tmp_path)
    (cached,) = tmp_path.iterdir()
    cached.write_bytes(b"half a file")
    assert FaceEmbedder(cache_dir=tmp_path).detect(skimage_data.astronaut())
    assert cached.stat().st_size > 100_000
