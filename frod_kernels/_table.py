"""Plain-text and markdown tables, for everything that prints one: frod-bench, the roofline, the cache listing."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """Columns of numbers right-aligned, text (and the first column) left-aligned; a GitHub table if ``markdown``."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    numeric = [i > 0 and bool(rows) and all(r[i] == "-" or r[i][:1].isdigit() for r in rows)
               for i in range(len(headers))]
    if markdown:
        rule = ["-" * (w - 1) + ":" if n else "-" * w for w, n in zip(widths, numeric)]
        return "\n".join("| " + " | ".join(r) + " |" for r in [headers, rule, *rows])
    out = ["  ".join(h.rjust(w) if n else h.ljust(w) for h, w, n in zip(headers, widths, numeric)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric)).rstrip() for r in rows]
    return "\n".join(out)
