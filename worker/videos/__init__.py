"""Videos as queue items: who appears in each video, and when.

- :mod:`worker.videos.appearances`: detections merged into appearances (a person's time ranges,
  best confidence and representative frame), their rows and the people counts of videos;
- :mod:`worker.videos.step`: one step of a video item in a run, with either backend.

A video is listed, claimed, started and written like an image (``worker/queue/images.py``); the
work on its bytes lives across runs in ``worker/queue/videos.py``.
"""
