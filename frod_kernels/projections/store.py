"""The projection cache (:mod:`frod_kernels.cache`) as the projections use it: salted with this code's own version,
so entries written by other projection code are never read."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Optional

from .. import cache as projection_cache
from .._env import VERSION


@functools.lru_cache(maxsize=1)
def salt() -> str:
    """The package version and a digest of every module of this package: a change to how any projection is
    computed makes every earlier entry a miss."""
    h = hashlib.sha256(VERSION.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        try:
            h.update(path.name.encode() + path.read_bytes())
        except OSError:  # no source file (a frozen install): the version alone then
            pass
    return h.hexdigest()


def open_store(cache: projection_cache.CacheArg = None) -> Optional[projection_cache.Store]:
    """The projection cache's store for ``cache`` (:func:`frod_kernels.cache.cache_dir`), or None when it is off."""
    return projection_cache.open_store(cache, salt=salt())
