"""Faces: detecting them, turning them into embeddings, and the people they are matched against.

- :mod:`worker.faces.models`: which model made an embedding (stored with every embedding);
- :mod:`worker.faces.weights`: the models' ONNX files, from an installed package, checked by hash;
- :mod:`worker.faces.detection`: face detection (YuNet), as plain data;
- :mod:`worker.faces.embeddings`: faces with their embeddings (SFace), as plain data;
- :mod:`worker.faces.gallery`: the enrolled people, and re-embedding them for a new model;
- :mod:`worker.faces.prefilter`: the free face check before a paid call.
"""
