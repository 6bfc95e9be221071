"""A seeded simulation of faults that drives celebscan's real queue code (see ``run.py``)."""
