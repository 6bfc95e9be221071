"""Media: turning an object's bytes into pixels a recognizer can read.

- :mod:`worker.media.images`: decoding one image, upright, to RGB.
"""
