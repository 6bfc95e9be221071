"""Face detection: OpenCV's YuNet, at two scales, as plain data.

YuNet finds faces of about 10 to 300 pixels in the picture it is given, with a score (0–1) and five
landmarks (the eyes, the nose tip, the corners of the mouth) that the embedding aligns on. A photo is
searched twice: downscaled to ``max_side`` (640: faces from ~1.6% of its longer side, in ~15 ms),
and downscaled to ``coarse_side`` (240: faces up to the whole picture, ~3 ms), which finds the faces
the first pass sees too large: a portrait, a tight crop of a face. The two passes' boxes are merged
by non-maximum suppression. HOG (dlib's frontal detector, before) needed 80-pixel faces, 100+ ms a
photo, and missed faces turned or cut by the frame (docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.faces.weights import YUNET, import_cv2
from worker.settings import Settings

#: Boxes of the two passes overlapping more than this (intersection over union) are one face.
NMS_OVERLAP = 0.3
#: Another detector's box is searched for its face's landmarks grown by this share of its size on
#: every side (that detector may box a face tighter or looser than YuNet does).
BOX_MARGIN = 0.5


@dataclass(frozen=True, eq=False)
class Detection:
    """One face in the original image's pixels: its box, YuNet's score and its five landmarks."""

    left: float
    top: float
    right: float
    bottom: float
    score: float
    #: (5, 2) x, y: the eye on the image's left, the other eye, the nose tip, the mouth's left and right corners.
    landmarks: np.ndarray

    @property
    def confidence(self) -> float:
        """The detector's score on Rekognition's 0–100 scale."""
        return 100.0 * self.score


class FaceDetector:
    @staticmethod
    def check_installed() -> None:
        """Raise :class:`MissingDependencyError` (with the pip command) when YuNet cannot load."""
        import_cv2()
        YUNET.locate()

    def __init__(self, *, max_side: int = 640, coarse_side: int = 240, min_score: float = 0.7) -> None:
        self._cv2 = cv2 = import_cv2()
        model = np.frombuffer(YUNET.read(), dtype=np.uint8)
        self._yunet = cv2.FaceDetectorYN.create("onnx", model, np.empty(0, np.uint8), (320, 320), min_score, 0.3, 5000)
        self.max_side = max_side
        self.coarse_side = min(coarse_side, max_side)
        self.min_score = min_score

    @classmethod
    def from_settings(cls, settings: Settings) -> FaceDetector:
        return cls(max_side=settings.detect_max_side, min_score=settings.min_face_score)

    def detect(self, pixels: np.ndarray) -> list[Detection]:
        """Every face in an upright RGB ``uint8`` array, strongest first."""
        longest = max(pixels.shape[:2])
        scale = min(1.0, self.max_side / longest)
        small = self._cv2.cvtColor(self._resized(pixels, scale), self._cv2.COLOR_RGB2BGR)  # YuNet learnt BGR
        passes = [self._found_in(small, scale)]
        coarse = self.coarse_side / longest
        if coarse < 0.75 * scale:  # resized from the first pass's copy: cheaper than from the original
            passes.append(self._found_in(self._resized(small, coarse / scale), coarse))
        rows = np.concatenate(passes)
        if len(passes) > 1 and len(rows) > 1:
            boxes = [[float(value) for value in row[:4]] for row in rows]
            kept = self._cv2.dnn.NMSBoxes(boxes, [float(row[14]) for row in rows], self.min_score, NMS_OVERLAP)
            rows = rows[np.asarray(kept, dtype=np.int64).reshape(-1)]
        rows = rows[np.argsort(-rows[:, 14], kind="stable")]
        return [
            Detection(
                float(row[0]),
                float(row[1]),
                float(row[0] + row[2]),
                float(row[1] + row[3]),
                float(row[14]),
                row[4:14].reshape(5, 2).copy(),
            )
            for row in rows
        ]

    def landmarks_at(self, pixels: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
        """The five landmarks (5, 2) of the face another detector boxed at ``box`` (left, top, right,
        bottom pixels): YuNet's on the box grown by ``BOX_MARGIN``, of the face whose centre lies in
        the box nearest its centre; None when YuNet finds no face there."""
        left, top, right, bottom = box
        x0, y0, x1, y1 = grown(box, BOX_MARGIN, pixels.shape)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None
        centre = np.array([(left + right) / 2 - x0, (top + bottom) / 2 - y0])
        inside = [
            found
            for found in self.detect(pixels[y0:y1, x0:x1])
            if left - x0 <= (found.left + found.right) / 2 <= right - x0
            and top - y0 <= (found.top + found.bottom) / 2 <= bottom - y0
        ]
        if not inside:
            return None
        nearest = min(inside, key=lambda found: float(np.linalg.norm(found.landmarks.mean(axis=0) - centre)))
        return nearest.landmarks + np.array([x0, y0], dtype=nearest.landmarks.dtype)

    def _resized(self, pixels: np.ndarray, scale: float) -> np.ndarray:
        """Area averaging: bilinear is 4 ms faster on a photo, but its aliasing made YuNet see faces
        in a shirt's folds (0.70 on faces-dev's biden2.jpg)."""
        if scale == 1.0:
            return pixels
        height, width = pixels.shape[:2]
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return self._cv2.resize(pixels, size, interpolation=self._cv2.INTER_AREA)

    def _found_in(self, small: np.ndarray, scale: float) -> np.ndarray:
        """YuNet's rows (x, y, w, h, 5 landmarks, score) in ``small``, a copy scaled by ``scale``, in
        the original's coordinates."""
        self._yunet.setInputSize((small.shape[1], small.shape[0]))
        _, found = self._yunet.detect(small)
        if found is None:
            return np.empty((0, 15), dtype=np.float32)
        found[:, :14] /= np.float32(scale)
        return found


def grown(box: tuple[float, float, float, float], margin: float, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """A (left, top, right, bottom) pixel box grown by ``margin`` of its size on every side, within
    an image of ``shape`` (height, width, ...): the pixels around a face worth keeping or searching."""
    left, top, right, bottom = box
    grow_x, grow_y = margin * (right - left), margin * (bottom - top)
    height, width = shape[:2]
    return (
        max(0, int(left - grow_x)),
        max(0, int(top - grow_y)),
        min(width, int(right + grow_x) + 1),
        min(height, int(bottom + grow_y) + 1),
    )
