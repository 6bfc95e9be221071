import numpy as np
import pytest
from PIL import Image

from tests.imagemaker import encode, halves, heic, jpeg, png_declaring
from worker.errors import ImageTooLargeError, ImageTooSmallError, InvalidImageError
from worker.media.images import ImageLimits, decode_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def colour_at(pixels, x, y):
    return tuple(int(v) for v in pixels[y, x])


def assert_close(actual, expected, tolerance=40):
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


def test_jpeg_decodes_to_rgb_array():
    image = decode_image(jpeg(200, 120))
    assert (image.width, image.height, image.format) == (200, 120, "JPEG")
    assert image.pixels.dtype == np.uint8 and image.pixels.shape == (120, 200, 3)
    assert_close(colour_at(image.pixels, 10, 60), RED)


@pytest.mark.parametrize(
    "data, code, words",
    [
        (b"", "EmptyObject", "0 bytes"),
        (b"just some notes, not a picture\n" * 10, "InvalidImageFormat", "text"),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "InvalidImageFormat", "HTML"),
        (b"\x00\x00\x00\x18ftypheic" + bytes(200), "InvalidImageFormat", "HEIC"),
    ],
)
def test_unreadable_bytes_fail_with_their_code(data, code, words):
    with pytest.raises(InvalidImageError) as failure:
        decode_image(data)
    assert failure.value.code == code
    assert words in str(failure.value)


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_truncated_file_is_corrupt(format):
    data = encode(halves(400, 300), format)
    with pytest.raises(InvalidImageError) as failure:
        decode_image(data[: len(data) // 2])
    assert failure.value.code == "CorruptImage"


def test_corrupt_jpeg_body_is_corrupt():
    data = bytearray(jpeg(400, 300))
    data[600:] = bytes(len(data) - 600)
    with pytest.raises(InvalidImageError) as failure:
        decode_image(bytes(data[:-2]))
    assert failure.value.code in {"CorruptImage", "InvalidImageFormat"}


def test_small_image_is_refused():
    with pytest.raises(ImageTooSmallError) as failure:
        decode_image(jpeg(60, 200))
    assert failure.value.code == "ImageTooSmall"
    assert "60x200" in str(failure.value)


def test_declared_dimensions_over_the_limit_are_refused_before_decoding():
    data = encode(Image.new("L", (5000, 4000)), "PNG")
    with pytest.raises(ImageTooLargeError) as failure:
        decode_image(data, ImageLimits(max_pixels=10_000_000))
    assert failure.value.code == "ImageTooLarge"


def test_decompression_bomb_is_refused():
    with pytest.raises(ImageTooLargeError) as failure:
        decode_image(png_declaring(60000, 60000))
    assert "decompression bomb" in str(failure.value)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90° anticlockwise; viewers rotate it clockwise
    stored = halves(200, 120).transpose(Image.Transpose.ROTATE_90)
    image = decode_image(encode(stored, "JPEG", quality=95, exif=exif))
    assert (image.width, image.height) == (200, 120)
    assert_close(colour_at(image.pixels, 10, 60), RED)
    assert_close(colour_at(image.pixels, 190, 60), BLUE)


def test_heic_from_a_phone_is_decoded_upright():
    exif = Image.Exif()
    exif[0x0112] = 6  # as for the JPEG above: a phone held upright, its sensor's pixels on their side
    stored = halves(200, 120).transpose(Image.Transpose.ROTATE_90)
    # pillow-heif writes the orientation as HEIF's own rotation (irot) beside the EXIF tag, as phones do
    image = decode_image(heic(stored, exif=exif.tobytes()))
    assert (image.width, image.height, image.format) == (200, 120, "HEIF")
    assert_close(colour_at(image.pixels, 10, 60), RED)
    assert_close(colour_at(image.pixels, 190, 60), BLUE)


def test_truncated_heic_is_corrupt():
    data = heic(halves(400, 300))
    with pytest.raises(InvalidImageError) as failure:
        decode_image(data[: len(data) - 10])
    assert failure.value.code == "CorruptImage"
    assert "HEIF" in str(failure.value)


def test_cmyk_jpeg_becomes_rgb():
    image = decode_image(encode(halves().convert("CMYK"), "JPEG"))
    assert image.pixels.shape[2] == 3
    assert_close(colour_at(image.pixels, 10, 60), RED, tolerance=60)


def test_16_bit_png_is_scaled_not_clipped():
    grey = np.full((120, 200), 32768, dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(grey), "PNG"))
    assert 120 <= image.pixels[50, 50, 0] <= 136


def test_transparent_areas_become_white():
    rgba = halves().convert("RGBA")
    alpha = np.full((120, 200), 255, dtype=np.uint8)
    alpha[:, :50] = 0
    rgba.putalpha(Image.fromarray(alpha))
    image = decode_image(encode(rgba, "PNG"))
    assert colour_at(image.pixels, 10, 60) == WHITE
    assert_close(colour_at(image.pixels, 60, 60), RED)


def test_palette_png_with_transparency():
    palette = halves().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    index_of_red = palette.getpixel((10, 10))
    image = decode_image(encode(palette, "PNG", transparency=index_of_red))
    assert colour_at(image.pixels, 10, 60) == WHITE
    assert_close(colour_at(image.pixels, 190, 60), BLUE)


def test_animated_gif_uses_first_frame():
    frames = [halves(), halves().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = decode_image(data)
    assert_close(colour_at(image.pixels, 10, 60), RED)


@pytest.mark.parametrize("format", ["WEBP", "TIFF", "BMP"])
def test_other_formats_pillow_reads(format):
    image = decode_image(encode(halves(), format))
    assert (image.width, image.height) == (200, 120)
    assert_close(colour_at(image.pixels, 190, 60), BLUE)
