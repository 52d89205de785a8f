"""``python -m frod_kernels.cache {list,size,clear}``: what the projection cache holds, how big it is, empty it.

    python -m frod_kernels.cache list                 # one line per entry: size, kind, category, ..., file
    python -m frod_kernels.cache size
    python -m frod_kernels.cache clear --yes
    python -m frod_kernels.cache --dir /scratch/frod list

The directory is the one setups use (``$FROD_CACHE_DIR``, else ``$XDG_CACHE_HOME/frod_kernels``, else
``~/.cache/frod_kernels``) unless ``--dir`` names another; ``FROD_CACHE=0`` does not hide it here.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .._table import format_table
from . import cache_dir, clear, entries


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _list(directory) -> str:
    rows = entries(directory)
    if not rows:
        return f"{cache_dir(directory)}: no entries"
    # the file name last and whole, so it can be copied (it is 80 characters: a digest)
    headers = ["size", "kind", "category", "layers", "width", "route/solver", "created", "note", "file"]
    body = []
    for r in rows:
        info = r.get("info", {})
        body.append([_mib(r["bytes"]), r.get("kind", "-"), info.get("category", "-"),
                     str(info.get("layers", info.get("layer", "-"))), str(info.get("width", "-")),
                     info.get("route", info.get("solver", "-")), info.get("created", "-"), r.get("problem", ""),
                     r["file"]])
    return "\n".join([f"{cache_dir(directory)}:", format_table(headers, body),
                      f"{len(rows)} files, {_mib(sum(r['bytes'] for r in rows))}"])


def _size(directory) -> str:
    rows = entries(directory)
    by_kind: dict[str, int] = {}
    for r in rows:
        by_kind[r.get("kind", "temporary")] = by_kind.get(r.get("kind", "temporary"), 0) + r["bytes"]
    detail = ", ".join(f"{k} {_mib(v)}" for k, v in sorted(by_kind.items()))
    return (f"{cache_dir(directory)}: {len(rows)} files, {_mib(sum(r['bytes'] for r in rows))}"
            + (f" ({detail})" if detail else ""))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m frod_kernels.cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="the cache directory (default: the one setups use)")
    p.add_argument("command", choices=("list", "size", "clear"))
    p.add_argument("--yes", action="store_true", help="clear without asking")
    args = p.parse_args(argv)
    directory = args.dir if args.dir else True
    if args.command == "list":
        print(_list(directory))
    elif args.command == "size":
        print(_size(directory))
    else:
        rows = entries(directory)
        if not rows:
            print(f"{cache_dir(directory)}: nothing to clear")
            return 0
        if not args.yes:
            total = _mib(sum(r["bytes"] for r in rows))
            prompt = f"delete {len(rows)} files ({total}) in {cache_dir(directory)}? [y/N] "
            try:
                answer = input(prompt)
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        files, n_bytes = clear(directory)
        print(f"{cache_dir(directory)}: deleted {files} files, {_mib(n_bytes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
