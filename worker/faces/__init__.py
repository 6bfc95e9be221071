"""Faces: detecting them, turning them into embeddings, the people they are matched against, and
the faces a scan remembers.

- :mod:`worker.faces.models`: which model made an embedding (stored with every embedding);
- :mod:`worker.faces.weights`: the models' ONNX files, from an installed package, checked by hash;
- :mod:`worker.faces.detection`: face detection (YuNet), as plain data;
- :mod:`worker.faces.embeddings`: faces with their embeddings (SFace), as plain data;
- :mod:`worker.faces.gallery`: the enrolled people, and re-embedding them for a new model;
- :mod:`worker.faces.prefilter`: the free face check before a paid call;
- the faces remembered: :mod:`worker.faces.remember` (Rekognition's faces embedded locally),
  :mod:`worker.faces.stored` and :mod:`worker.faces.removals` (the embeddings in the database),
  :mod:`worker.faces.index` (the faiss index built from them), :mod:`worker.faces.labelling`,
  :mod:`worker.faces.search`, :mod:`worker.faces.grouping` and :mod:`worker.faces.unknown`.
"""
