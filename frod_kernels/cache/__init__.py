"""A content-keyed, salted tensor store on disk: what is computed once from some tensors is read back the next time.

It knows nothing of what it stores. A caller names an entry by a *kind* (a short word) and the *fields* its tensors
are a function of (digests of input tensors, settings), and gives a *salt* that changes whenever its computation
does; the entry's key is the SHA-256 of all three, so a hit returns the very tensors the computation gave when the
entry was written. The projections (:mod:`frod_kernels.projections.store`) are its one user: V, the patterns, U
and lambda_l of a model, salted with a digest of their own code.

Entries are safetensors files (no pickle: an entry from elsewhere cannot run code) written to a temporary file
in the cache directory, fsynced, then renamed into place, so a crash or two writers at once never leave a partial
entry. Each stores its key and a SHA-256 per tensor in its header; an entry that cannot be parsed (truncated, not
safetensors), holds another key (a foreign file renamed into place) or fails a checksum is never used: a
``UserWarning`` names it, the caller recomputes it and the entry is replaced. The store trusts its directory as
far as that goes: whoever can write there can plant a well-formed entry, so it is created private (0700).

Where (:func:`cache_dir`): a ``cache=`` argument (a path; ``True``: the default place even if ``FROD_CACHE=0``;
``False``: off), else off when ``FROD_CACHE=0``, else ``$FROD_CACHE_DIR``, ``$XDG_CACHE_HOME/frod_kernels`` or
``~/.cache/frod_kernels``. An entry is not written when it would leave less than 5% of the disk (at least 1 GiB)
free, and an unwritable directory turns writing off with one warning: a caller never fails for the cache.
``python -m frod_kernels.cache {list,size,clear}`` shows and empties it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import _env
from .._env import VERSION
from .._tensor_cache import TensorCache

__all__ = ["ENV_DIR", "ENV_SWITCH", "FORMAT", "Store", "cache_dir", "clear", "digest_scope", "digests", "entries",
           "open_store", "tensor_digest"]

FORMAT = 1
ENV_DIR = "FROD_CACHE_DIR"
ENV_SWITCH = "FROD_CACHE"
_ENTRY = re.compile(r"^[A-Za-z]+-[0-9a-f]{64}\.safetensors$")
_TMP_PREFIX = ".tmp-"

CacheArg = Union[None, bool, str, "os.PathLike[str]"]


def _default_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # the XDG spec: a relative XDG_CACHE_HOME is invalid and ignored
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "frod_kernels"


def cache_dir(cache: CacheArg = None) -> Optional[Path]:
    """The directory the projection cache reads and writes, or None when it is off.

    ``cache``: None (the default: off when ``$FROD_CACHE`` is 0/false/no/off, else the default place), True (the
    default place), False (off), or a directory. The default place is ``$FROD_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/frod_kernels``, else ``~/.cache/frod_kernels``.
    """
    if cache is None:
        return _default_dir() if _env.flag(ENV_SWITCH, True) else None
    if cache is True:
        return _default_dir()
    if cache is False:
        return None
    if isinstance(cache, (str, os.PathLike)):
        path = os.fspath(cache)
        if not path:
            raise ValueError("cache: expected a directory path, got an empty string")
        return Path(path).expanduser()
    raise TypeError(f"cache: expected None, True, False or a directory path, got {type(cache).__name__} {cache!r}")


def open_store(cache: CacheArg = None, *, salt: str) -> Optional["Store"]:
    """The :class:`Store` for ``cache`` (see :func:`cache_dir`) with the caller's ``salt``, or None when caching is
    off."""
    root = cache_dir(cache)
    return None if root is None else Store(root, salt)


# ---------------------------------------------------------------------------------------------------------------
# Content digests


def _bytes(t: torch.Tensor):
    """The tensor's bytes in row-major order as a zero-copy buffer (one copy to the CPU or to contiguous if
    needed); through uint8 because bfloat16 has no numpy dtype."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _digest(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    if t.numel():
        h.update(_bytes(t))
    return h.hexdigest()


# Within one PEFT injection the same weight and V are hashed for the category's V and again for each layer's U.
# Only there: a scope ends before the caller could change a weight without its version or storage changing.
_memo: Optional[TensorCache] = None


@contextlib.contextmanager
def digest_scope() -> Iterator[None]:
    """Within the block, :func:`tensor_digest` hashes each tensor once (per tensor state); the weights must not
    change inside it."""
    global _memo
    if _memo is not None:
        yield
        return
    _memo = TensorCache()
    try:
        yield
    finally:
        _memo = None


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's dtype, shape and bytes in row-major order: the same for any memory layout."""
    return digests([t])[0]


def _parallel_digests(tensors: Sequence[torch.Tensor]) -> list[str]:
    # hashlib releases the GIL while it hashes; a pool pays off for a model's weights, not for one entry's tensors
    workers = min(len(tensors), torch.get_num_threads())
    if len(tensors) < 4 or workers < 2:
        return [_digest(t) for t in tensors]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_digest, tensors))


def digests(tensors: Sequence[torch.Tensor]) -> list[str]:
    """:func:`tensor_digest` of each tensor, hashed in parallel."""
    if _memo is None:
        return _parallel_digests(tensors)
    known = [_memo.peek(t, "digest") for t in tensors]
    missing = [i for i, d in enumerate(known) if d is None]
    for i, d in zip(missing, _parallel_digests([tensors[i] for i in missing])):
        known[i] = _memo.get(tensors[i], "digest", lambda d=d: d)
    return known


# ---------------------------------------------------------------------------------------------------------------
# Entries

_warned: set = set()


def _warn_once(tag: tuple, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, UserWarning, stacklevel=4)


class Store:
    """One cache directory as one caller sees it: :meth:`fetch` returns an entry's tensors, computing and writing
    them on a miss. ``salt`` is part of every key: callers whose computations differ never share an entry."""

    def __init__(self, root: Path, salt: str):
        self.root = Path(root)
        self.salt = salt

    def key(self, kind: str, fields: dict) -> str:
        material = {"format": FORMAT, "kind": kind, "salt": self.salt, **fields}
        return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}.safetensors"

    def fetch(self, kind: str, fields: dict, compute: Callable[[], dict[str, torch.Tensor]], *,
              expect: Optional[dict[str, tuple]] = None, info: Optional[dict] = None) -> dict[str, torch.Tensor]:
        """The tensors of the entry keyed by ``(kind, fields)``; on a miss ``compute()``'s, written as the entry."""
        hit = self.get(kind, fields, expect)
        if hit is not None:
            return hit
        tensors = compute()
        self.put(kind, fields, tensors, info)
        return tensors

    def get(self, kind: str, fields: dict, expect: Optional[dict[str, tuple]] = None
            ) -> Optional[dict[str, torch.Tensor]]:
        """The entry's tensors, or None when it is missing or not usable (then with a warning that names it).
        ``expect``: name -> (dtype, shape or None) the entry must hold."""
        return self.load(kind, self.key(kind, fields), expect or {})

    def put(self, kind: str, fields: dict, tensors: dict[str, torch.Tensor], info: Optional[dict] = None) -> None:
        """Write the entry keyed by ``(kind, fields)``; ``info`` is what ``list`` shows (not part of the key)."""
        self.save(kind, self.key(kind, fields), tensors, info or {})

    def load(self, kind: str, key: str, expect: dict[str, tuple]) -> Optional[dict[str, torch.Tensor]]:
        """The entry's tensors, or None when it is missing or not usable (warned: the caller recomputes it)."""
        path = self.path(kind, key)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key or meta.get("format") != str(FORMAT):
                    return self._reject(path, "it holds another entry (its stored key differs from its name's)")
                checksums = json.loads(meta.get("checksums", "null"))
                if not isinstance(checksums, dict) or set(checksums) != set(f.keys()):
                    return self._reject(path, "its checksums do not list its tensors")
                stored = {name: f.get_tensor(name) for name in f.keys()}
        except FileNotFoundError:
            return None
        except Exception as e:  # safetensors' own error for truncated or foreign files, or unreadable JSON
            return self._reject(path, f"it cannot be read as a cache entry ({type(e).__name__}: {e})")
        # not through the digest memo: it would keep every entry read in a PEFT injection alive to its end
        for name, digest in zip(stored, _parallel_digests(list(stored.values()))):
            if digest != checksums[name]:
                return self._reject(path, f"tensor {name!r} fails its SHA-256 checksum (corrupt)")
        for name, (dtype, shape) in expect.items():
            t = stored.get(name)
            if t is None or t.dtype != dtype or (shape is not None and tuple(t.shape) != tuple(shape)):
                got = "nothing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                return self._reject(path, f"tensor {name!r} is {got}, expected {dtype} {shape}")
        return stored

    def _reject(self, path: Path, why: str) -> None:
        warnings.warn(f"frod_kernels cache: not using {path}: {why}; recomputing it and replacing the "
                      "entry", UserWarning, stacklevel=4)
        return None

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor], info: dict) -> None:
        """Write the entry atomically; warn (once per directory and reason) and skip when that cannot be done."""
        stored = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        nbytes = sum(t.numel() * t.element_size() for t in stored.values())
        tmp = None
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            usage = shutil.disk_usage(self.root)
            if usage.free - nbytes < max(1 << 30, usage.total // 20):
                _warn_once((str(self.root), "full"), f"frod_kernels cache: not writing to {self.root}: "
                           f"less than 5% of its disk (or 1 GiB) would stay free ({usage.free / 2**30:.1f} GiB free "
                           f"now); python -m frod_kernels.cache clear empties it, FROD_CACHE=0 turns it off")
                return
            meta = {"format": str(FORMAT), "key": key, "kind": kind,
                    "checksums": json.dumps(dict(zip(stored, _parallel_digests(list(stored.values()))))),
                    "info": json.dumps(_info(info))}
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=_TMP_PREFIX, suffix=".safetensors")
            os.close(fd)
            save_file(stored, tmp, metadata=meta)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path(kind, key))
            tmp = None
        except OSError as e:
            _warn_once((str(self.root), "write"), f"frod_kernels cache: cannot write to {self.root} "
                       f"({type(e).__name__}: {e}); projections are computed without it")
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _info(info: dict) -> dict:
    return {**info, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "frod_kernels": VERSION, "torch": torch.__version__, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------------
# Inspection


def _files(root: Path) -> list[Path]:
    """The cache's entries and leftover temporary files: only names it writes, so a directory shared by mistake
    keeps everything else."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_file() and (_ENTRY.match(p.name) or
                                                                  p.name.startswith(_TMP_PREFIX)))


def entries(cache: CacheArg = True) -> list[dict[str, Any]]:
    """One dict per file of the cache: ``file``, ``bytes``, ``kind`` and what its header says (``info``: category,
    layers, width, route, created, versions), or ``problem`` for a leftover temporary file or an unreadable one."""
    root = cache_dir(cache)
    out = []
    for path in [] if root is None else _files(root):
        row: dict[str, Any] = {"file": path.name, "bytes": path.stat().st_size}
        if path.name.startswith(_TMP_PREFIX):
            row["problem"] = "temporary file of an unfinished write"
        else:
            row["kind"] = path.name.split("-", 1)[0]
            try:
                with safe_open(path, framework="pt") as f:
                    row["info"] = json.loads((f.metadata() or {}).get("info", "{}"))
            except Exception as e:
                row["problem"] = f"unreadable ({type(e).__name__})"
        out.append(row)
    return out


def clear(cache: CacheArg = True) -> tuple[int, int]:
    """Delete every entry (and leftover temporary file) of the cache; returns (files, bytes) removed."""
    root = cache_dir(cache)
    files = n_bytes = 0
    for path in [] if root is None else _files(root):
        with contextlib.suppress(FileNotFoundError):  # another process may clear at once
            size = path.stat().st_size
            path.unlink()
            files, n_bytes = files + 1, n_bytes + size
    return files, n_bytes
