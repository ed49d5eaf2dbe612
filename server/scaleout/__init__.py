"""Scale-out on a Ray cluster: the same HTTP API behind a Ray Serve ingress, one replica of the
engine per GPU (or CPU slot), and a request router that places each upload on the replica whose
free memory fits it best.

Ray is an optional extra (``pip install '.[ray]'``). Only :mod:`server.scaleout.fit` (the pure
ranking, tested without Ray) and :mod:`server.scaleout.placement` (the device chosen, the wait
for placement; Ray imported where used) import without it; the other modules need Ray:

- :mod:`server.scaleout.replica`: the replica deployment (our app and engine, its routing stats)
- :mod:`server.scaleout.router`: the memory-aware ``RequestRouter``
- :mod:`server.scaleout.ingress`: the CPU ingress that forwards raw requests
- :mod:`server.scaleout.deploy`: building the application, ``python -m server ray``, ``serve run``
"""

from server.scaleout.fit import ReplicaLoad, need_bytes, rank_replicas, upload_seconds

__all__ = ["ReplicaLoad", "need_bytes", "rank_replicas", "upload_seconds"]
