"""The garbage collector of a long-running process (the server, a worker process), tuned once
everything it starts with is loaded.

A request allocates a few hundred objects; with Python's default threshold (a collection of the
youngest generation every 700 allocations, and of the older ones every 10 and 100 of those), a
no-op `/put` spent about a sixth of its time in the collector, most of it walking the objects
of FastAPI, pydantic and the kinds, which live as long as the process. `gc.freeze()` moves
those out of the collector's sight, and a larger threshold makes the young collections rarer
(each still finds the same cycles: a request's garbage is freed by reference counting, not by
the collector, apart from the occasional exception's traceback cycle).
"""

from __future__ import annotations

import gc

# A young collection every 50,000 allocations (not 700: a hundred no-op /put requests, not
# one), the middle one every 20 of those and the oldest every 10 of the middle's (the oldest
# also only once a quarter of what it holds is new, as by default). What reference cycles hold
# until a collection frees them stays small: a few MB.
THRESHOLDS = (50_000, 20, 10)


def settle() -> None:
    """Collect what starting left behind, freeze the rest, and raise the threshold; call once
    the process has started (its imports, app and engine made), before its work."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
