"""celebscan's producer side: the ``celebscan`` command and what runs in its process.

Starting, listing and resuming a scan, the embedded scan's process pool, exports, the HTML report,
metrics and cost estimates, and the generated reference of the docs (``docs/design.md`` maps them).
"""
