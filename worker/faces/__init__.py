"""Faces: detecting them, turning them into embeddings, and the people they are matched against.

- :mod:`worker.faces.embeddings`: detection and 128-d embeddings, as plain data;
- :mod:`worker.faces.net`: dlib's embedding network evaluated with numpy;
- :mod:`worker.faces.gallery`: the enrolled people;
- :mod:`worker.faces.prefilter`: the free face check before a paid call.
"""
