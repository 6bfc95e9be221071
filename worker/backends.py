"""The recognizer backends by name: what settings accept and which ones are billed per call.

A module of its own, importing nothing, so that the settings and the recognizers (which read
settings) can both name the backends without importing each other.
"""

BACKENDS = ("local", "rekognition")
#: Backends whose calls are billed per image.
PAID_BACKENDS = frozenset({"rekognition"})
