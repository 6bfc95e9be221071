"""One error tree for everything a scan can run into.

Each error has a ``code`` that is stored on the image's row and shown to users, so a user can tell
"not an image" from "access denied" from "throttled". ``TransientError`` subclasses are the only
errors worth retrying; everything under ``PermanentError`` ends the image ``failed`` at once.
"""

from __future__ import annotations


class CelebscanError(Exception):
    """Base of every error celebscan raises on purpose."""

    code = "Error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigurationError(CelebscanError):
    """Bad settings or arguments, or a service that cannot be reached: the CLI exits non-zero."""

    code = "ConfigurationError"


class MissingDependencyError(ConfigurationError):
    """An optional extra is not installed; the message names the pip command that fixes it."""

    code = "MissingDependency"


class ListingFailedError(ConfigurationError):
    """Listing a source stopped part-way; what was listed is recorded and the scan can be resumed."""

    code = "ListingFailed"


class ListingTakenOverError(ConfigurationError):
    """Another process lists this scan's source now (this one stalled longer than its lease)."""

    code = "ListingTakenOver"


class RecognizerUnavailableError(ConfigurationError):
    """This worker cannot run the recognizer a batch needs; the batch goes back for another worker.

    Never stored on an image: which worker picked a batch up must not decide its images' fate.
    """

    code = "RecognizerUnavailable"


class PermanentError(CelebscanError):
    """Fails the image without retrying: retrying cannot change the outcome."""

    code = "PermanentError"


class InvalidImageError(PermanentError):
    """The bytes are not an image celebscan can decode (not an image, corrupt, truncated)."""

    code = "InvalidImageFormat"


class ImageTooSmallError(PermanentError):
    code = "ImageTooSmall"


class ImageTooLargeError(PermanentError):
    code = "ImageTooLarge"


class InvalidVideoError(PermanentError):
    """The bytes are not a video celebscan can read: an unknown container (``InvalidVideoFormat``),
    or a header that is truncated or broken (``CorruptVideo``)."""

    code = "InvalidVideoFormat"


class VideoOverLimitsError(PermanentError):
    """A video over what its recognizer takes (Rekognition Video: MP4, MOV or AVI, H.264, at most
    10 GB and 6 hours; a video in S3): found from the header, before any call. The code says which
    limit (``UnsupportedVideoFormat``, ``UnsupportedVideoCodec``, ``VideoTooLarge``, ``VideoTooLong``,
    ``VideoNotInS3``)."""

    code = "VideoOverLimits"


class VideoJobFailedError(PermanentError):
    """Rekognition Video ended the video's job FAILED (its status message says why)."""

    code = "VideoJobFailed"


class ObjectMissingError(PermanentError):
    """The object was listed but is gone (deleted or moved) when the worker reads it."""

    code = "ObjectNotFound"


class ObjectChangedError(PermanentError):
    """The object was listed, then overwritten: what the worker would read is not what was listed
    (its result would describe other bytes). The next scan records the new version."""

    code = "ObjectChanged"


class AccessDeniedError(PermanentError):
    code = "AccessDenied"


class GalleryError(PermanentError):
    """An image cannot be enrolled (no face, several faces) or a person is unknown."""

    code = "GalleryError"


class TransientError(CelebscanError):
    """May succeed when tried again: throttling, 5xx, connection resets, a busy database."""

    code = "TransientError"


class ThrottledError(TransientError):
    code = "ThrottlingException"


class ServiceUnavailableError(TransientError):
    code = "ServiceUnavailable"
