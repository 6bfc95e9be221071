"""celebscan's worker side: reading images, recognizing faces, storing results.

The Celery app lives in :mod:`worker.celery_app`; everything else here is plain Python that the
embedded process pool and the tests call directly.
"""
