"""dlib's face recognition ResNet, evaluated with numpy.

Why this exists: the ``dlib-bin`` wheel is built without BLAS, so its forward pass of the face
recognition network takes ~135 ms a face on one core and dominates the local recognizer. numpy
ships an optimised BLAS (OpenBLAS), and the network is a plain ResNet of 29 convolutions: run with
numpy from the very same weights (``dlib_face_recognition_resnet_model_v1.dat`` from
``face-recognition-models``) it gives the same 128-d descriptors (within 3e-7 of dlib's; tested to 1e-5)
several times faster. dlib still detects faces, finds landmarks and cuts the aligned 150x150 chip.

The model file is dlib's own serialization, read here without dlib: the layers are stored in
forward order, each convolution as ``con_4`` + parameters + shape, each batch-norm-turned-affine as
``affine_`` + gamma and beta, the last layer as ``fc_2``. The network's wiring (the ResNet of dlib's
``dnn_face_recognition_ex.cpp``) is not readable from the file; it is built from the convolutions'
strides and checked against the file's layer counts, so a different model fails loudly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

CHIP_SIZE = 150
CHIP_PADDING = 0.25
CHIPS_AT_ONCE = 8  # measured: 1 chip 23.8 ms, 2+ ~20 ms a chip; more gains nothing
_LAYER_NAMES = (b"input_rgb_image_sized", b"con_4", b"affine_", b"fc_2")
# A layer's name as dlib serializes a string: its length as an integer (1 byte long), then the bytes.
_LAYER_NAME = re.compile(b"|".join(b"\x01" + bytes([len(name)]) + re.escape(name) for name in _LAYER_NAMES))


class ModelFormatError(ValueError):
    """The model file is not the dlib face recognition ResNet this module knows how to run."""


@dataclass(frozen=True)
class _Convolution:
    """A convolution with the affine layer after it folded in: ``out = windows @ weights + bias``."""

    weights: np.ndarray  # (channels_in * size * size, channels_out), rows in (y, x, C) order
    bias: np.ndarray
    size: int
    stride: int
    padding: int

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.padding:
            pad = self.padding
            images = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        windows = sliding_window_view(images, (self.size, self.size), axis=(1, 2))[:, :: self.stride, :: self.stride]
        windows = windows.transpose(0, 1, 2, 4, 5, 3)
        count, rows, cols = windows.shape[:3]
        out = windows.reshape(count * rows * cols, -1) @ self.weights
        out += self.bias
        return out.reshape(count, rows, cols, -1)


class FaceDescriptorNet:
    """The network: ``descriptors(chips)`` turns aligned 150x150 RGB face chips into 128-d vectors."""

    def __init__(self, model_path: str | Path) -> None:
        data = Path(model_path).read_bytes()
        reader = _Reader(data)
        self.channel_means: np.ndarray | None = None
        convolutions: list[_Convolution] = []
        pending: tuple[np.ndarray, np.ndarray, int, int, int] | None = None
        fc_weights = None
        for match in _LAYER_NAME.finditer(data):
            reader.at = match.end()
            name = match.group()[2:]
            if name == b"input_rgb_image_sized":
                self.channel_means = np.array([reader.float() for _ in range(3)], dtype=np.float32)
            elif name == b"con_4":
                params = reader.tensor()
                filters, size, size_x, stride, stride_x, padding, padding_x = (reader.int() for _ in range(7))
                if size != size_x or stride != stride_x or padding != padding_x:
                    raise ModelFormatError("only square convolutions are supported")
                channels_in = (params.size - filters) // (filters * size * size)
                weights = params[:-filters].reshape(filters, channels_in, size, size).transpose(2, 3, 1, 0)
                matrix = weights.reshape(size * size * channels_in, filters)
                pending = (matrix, params[-filters:], size, stride, padding)
            elif name == b"affine_":
                if pending is None:
                    raise ModelFormatError("an affine layer without a convolution before it")
                weights, bias, size, stride, padding = pending
                gamma, beta = np.split(reader.tensor(), 2)
                convolutions.append(
                    _Convolution(np.ascontiguousarray(weights * gamma), bias * gamma + beta, size, stride, padding)
                )
                pending = None
            else:
                outputs, inputs = reader.int(), reader.int()
                fc_weights = reader.tensor().reshape(inputs, outputs)
        if self.channel_means is None or fc_weights is None or len(convolutions) != 29 or pending is not None:
            raise ModelFormatError(f"{model_path} is not dlib_face_recognition_resnet_model_v1")
        self._stem = convolutions[0]
        self._units = [(convolutions[i], convolutions[i + 1]) for i in range(1, len(convolutions), 2)]
        self._fc = fc_weights

    def descriptors(self, chips: np.ndarray) -> np.ndarray:
        """(N, 128) float64 descriptors of (N, 150, 150, 3) uint8 RGB chips, as dlib computes them.

        Chips go through the network a few at a time: the first layer's windows take 3 MB a chip,
        and a crowd photo can hold a hundred faces.
        """
        if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(f"expected (N, {CHIP_SIZE}, {CHIP_SIZE}, 3) chips, got {chips.shape}")
        parts = [self._forward(chips[start : start + CHIPS_AT_ONCE]) for start in range(0, len(chips), CHIPS_AT_ONCE)]
        return np.concatenate(parts) if parts else np.empty((0, 128))

    def _forward(self, chips: np.ndarray) -> np.ndarray:
        assert self.channel_means is not None  # checked when the model was read
        x = (chips.astype(np.float32) - self.channel_means) / np.float32(256.0)
        x = _relu(self._stem(x))
        x = sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))
        for first, second in self._units:
            residual = second(_relu(first(x)))
            shortcut = x if first.stride == 1 else _average_pool_2x2(x)
            x = _relu(_add_zero_padded(residual, shortcut))
        pooled = x.mean(axis=(1, 2))
        return (pooled @ self._fc).astype(np.float64)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0, out=x)


def _average_pool_2x2(x: np.ndarray) -> np.ndarray:
    return sliding_window_view(x, (2, 2), axis=(1, 2))[:, ::2, ::2].mean(axis=(-2, -1))


def _add_zero_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """dlib's ``add_prev``: the sum over the larger of each dimension, missing values counting as 0.

    Down-sampling units add a strided convolution and a 2x2 average pool whose outputs can differ
    in size by one (8x8 input: 3x3 against 4x4) and in channels (the pool keeps the input's).
    """
    if a.shape == b.shape:
        return a + b
    out = np.zeros(np.maximum(a.shape, b.shape), dtype=a.dtype)
    out[: a.shape[0], : a.shape[1], : a.shape[2], : a.shape[3]] += a
    out[: b.shape[0], : b.shape[1], : b.shape[2], : b.shape[3]] += b
    return out


class _Reader:
    """dlib's serialization: integers as a length byte (top bit = sign) + little-endian bytes,
    floats as integer mantissa and exponent, tensors as a version, four dimensions and raw float32s."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def int(self) -> int:
        head = self.data[self.at]
        length = head & 0x7F
        value = int.from_bytes(self.data[self.at + 1 : self.at + 1 + length], "little")
        self.at += 1 + length
        return -value if head & 0x80 else value

    def float(self) -> float:
        mantissa = self.int()
        return float(mantissa * 2.0 ** self.int())

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise ModelFormatError(f"tensor serialization version {version} is not supported")
        count = int(np.prod([self.int() for _ in range(4)]))
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.at)
        self.at += 4 * count
        return values.astype(np.float32)
