"""The rekognition recognizer's real boto3 path against the HTTP stand-in (and moto's S3)."""

import numpy as np
import pytest
from PIL import Image

from tests.clirun import celebscan
from tests.imagemaker import encode, halves, heic, jpeg
from tests.rekognition_standin import celebrity
from worker.errors import PermanentError, ServiceUnavailableError, ThrottledError
from worker.media.images import decode_image
from worker.recognizers.rekognition import MAX_BYTES, RekognitionRecognizer
from worker.settings import Settings
from worker.sources import S3Location


@pytest.fixture
def recognizer(rekognition):
    return RekognitionRecognizer.from_settings(Settings(backend="rekognition"))


def test_every_response_field_is_kept(rekognition, recognizer):
    rekognition.answer = lambda key, data: {
        "CelebrityFaces": [celebrity("Jeff Bezos", gender="Male")],
        "UnrecognizedFaces": [
            {
                "BoundingBox": {"Width": 0.1, "Height": 0.1, "Left": 0.7, "Top": 0.1},
                "Confidence": 97.0,
                "Pose": {"Roll": 0, "Yaw": 0, "Pitch": 0},
            }
        ],
        "OrientationCorrection": "ROTATE_0",
    }
    result = recognizer.recognize(decode_image(jpeg(300, 200)))
    [bezos] = result.celebrities
    assert (bezos.name, bezos.match_confidence, bezos.known_gender) == ("Jeff Bezos", 98.5, "Male")
    assert bezos.urls == ("www.wikidata.org/wiki/Jeff Bezos",)
    assert bezos.raw["Face"]["Emotions"][0]["Type"] == "HAPPY" and "Smile" in bezos.raw["Face"]
    assert result.unrecognized_faces[0].confidence == 97.0
    assert result.unrecognized_faces[0].raw["Pose"] == {"Roll": 0, "Yaw": 0, "Pitch": 0}


def test_an_image_in_s3_is_passed_by_reference(rekognition, recognizer, s3, bucket):
    data = jpeg(300, 200)
    s3.put_object(Bucket=bucket, Key="in s3/ä.jpg", Body=data)
    recognizer.recognize(decode_image(data), S3Location(bucket, "in s3/ä.jpg", len(data)))
    [call] = rekognition.calls
    assert (call.kind, call.key, call.size) == ("S3Object", "in s3/ä.jpg", len(data))


def test_a_local_image_is_sent_as_its_own_bytes(rekognition, recognizer):
    data = jpeg(300, 200)
    recognizer.recognize(decode_image(data))
    [call] = rekognition.calls
    assert call.kind == "Bytes" and call.size == len(data)


@pytest.mark.parametrize("format", ["WEBP", "TIFF", "GIF"])
def test_formats_rekognition_cannot_read_are_converted_to_jpeg(rekognition, recognizer, s3, bucket, format):
    data = encode(halves(300, 200), format)
    s3.put_object(Bucket=bucket, Key="x", Body=data)
    recognizer.recognize(decode_image(data), S3Location(bucket, "x", len(data)))
    [call] = rekognition.calls
    assert call.kind == "Bytes" and call.answered == "ok"


def test_exif_rotated_images_are_sent_upright(rekognition, recognizer):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(halves(300, 200).transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)
    seen = []
    rekognition.answer = lambda key, sent: seen.append(Image.open(__import__("io").BytesIO(sent)).size) or {}
    recognizer.recognize(decode_image(data))
    assert seen == [(300, 200)]


def test_a_phone_s_heic_is_sent_once_as_an_upright_jpeg(rekognition, s3, bucket, aws_env, tmp_path):
    """A HEIC picture (the iPhone's format, which Rekognition refuses), stored under two keys and
    scanned: one call, with an upright JPEG within the 5 MB limit; both images named."""
    exif = Image.Exif()
    exif[0x0112] = 6
    noise = np.random.default_rng(2).integers(0, 60, (1200, 1600, 3), dtype=np.uint8)
    stored = Image.fromarray(np.asarray(halves(1600, 1200)) - noise).transpose(Image.Transpose.ROTATE_90)
    data = heic(stored, exif=exif.tobytes())
    for key in ("phone/IMG_0001.HEIC", "backup/IMG_0001.HEIC"):
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    sent = []
    rekognition.answer = lambda key, image: sent.append(image) or {"CelebrityFaces": [celebrity("Jeff Bezos")]}
    database = f"sqlite:///{tmp_path / 'heic.db'}"
    env = {**aws_env, "AWS_ENDPOINT_URL_REKOGNITION": rekognition.url}
    args = ("--database-url", database, "scan", f"s3://{bucket}/", "--backend", "rekognition", "--workers", "1")
    output = celebscan(*args, env=env).output
    assert "paid calls: 1" in output and "1 duplicates reused" in output, output
    [call] = rekognition.calls
    assert call.kind == "Bytes" and call.answered == "ok" and call.size <= MAX_BYTES
    picture = Image.open(__import__("io").BytesIO(sent[0]))
    assert picture.format == "JPEG" and picture.size == (1600, 1200)
    records = celebscan("--database-url", database, "results", env=env).output
    assert records.count('"name": "Jeff Bezos"') == 2 and records.count('"status": "done"') == 2, records


def test_images_over_5_mb_are_shrunk_to_fit(rekognition, recognizer):
    noise = np.random.default_rng(1).integers(0, 255, (2400, 3200, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    assert len(data) > MAX_BYTES
    recognizer.recognize(decode_image(data))
    [call] = rekognition.calls
    assert call.kind == "Bytes" and call.size <= MAX_BYTES and call.answered == "ok"


@pytest.mark.parametrize(
    "setting, error, code",
    [
        ("throttle_every", ThrottledError, "ThrottlingException"),
        ("fail_every", ServiceUnavailableError, "InternalServerError"),
    ],
)
def test_transient_service_errors_are_typed_for_retry(rekognition, recognizer, setting, error, code):
    setattr(rekognition, setting, 1)
    with pytest.raises(error) as failure:
        recognizer.recognize(decode_image(jpeg()))
    assert failure.value.code == code
    assert len(rekognition.calls) == 1, "botocore must not retry on its own"


def test_a_missing_s3_object_is_a_permanent_error(rekognition, recognizer, bucket):
    with pytest.raises(PermanentError) as failure:
        recognizer.recognize(decode_image(jpeg()), S3Location(bucket, "gone.jpg", 100))
    assert failure.value.code == "InvalidS3Object"


def test_unreachable_service_is_transient(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_REKOGNITION", "http://127.0.0.1:1")
    recognizer = RekognitionRecognizer.from_settings(Settings())
    with pytest.raises(ServiceUnavailableError):
        recognizer.recognize(decode_image(jpeg()))
