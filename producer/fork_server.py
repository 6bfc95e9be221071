"""Imported by the embedded pool's fork server, and by no other process.

The fork server forks the pool's processes and holds nothing else: no connection, no file, no
buffered output. When the command that started it ends, Python would still tear down every module
it preloaded (OpenCV, NumPy, SQLAlchemy: a tenth of a second) while holding the command's standard
output and error, so that a caller reading them (a pipe, ``subprocess.run``) would wait for it.
It leaves at once instead. The processes it forks never run these exit handlers (they end by
``os._exit`` after their work, as every forked process of ``multiprocessing`` does).
"""

import atexit
import os

atexit.register(os._exit, 0)
