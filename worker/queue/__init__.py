"""The queue of record: one module per lifecycle, each transition one guarded statement.

- ``images``: an image's (record a listing, claim, start, write, release), fenced by the claim token;
- ``pictures``: a picture being recognized by one run, so its copies wait instead of paying again;
- ``parts``: a listing part's (claim, record a page, fail, end), fenced by the claim and the last key;
- ``scans``: a scan's (listing ended, finished, repaired by ``scan --resume``);
- ``leases``: the leases live holders renew.
"""
