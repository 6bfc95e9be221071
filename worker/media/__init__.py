"""Media: turning an object's bytes into pixels a recognizer can read.

- :mod:`worker.media.images`: decoding one image, upright, to RGB;
- :mod:`worker.media.video`: a video's header (format, codec, length) read without decoding, and
  its frames, sampled in bounded memory.

A scan lists both (:func:`is_media_name`); a video's row says so (``images.media``).
"""

from __future__ import annotations

from worker.media.images import is_image_name
from worker.media.video import is_video_name


def is_media_name(name: str) -> bool:
    """An object a scan lists: an image or a video, by its name's extension."""
    return is_image_name(name) or is_video_name(name)
