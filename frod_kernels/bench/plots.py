"""PNG plots of a results.json: time and peak memory against tokens per method (layer), and bars (train, init)."""

from __future__ import annotations

import os
from collections import defaultdict


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a benchmark machine
    import matplotlib.pyplot as plt

    return plt


class NullLocator:
    """matplotlib.ticker.NullLocator, imported once matplotlib is (it is an optional dependency)."""

    def __new__(cls):
        from matplotlib.ticker import NullLocator as _NullLocator

        return _NullLocator()


def _title(env: dict, what: str) -> str:
    return f"{what}\n{env['device_name']} · torch {env['versions']['torch']} · {env['date'][:10]}"


def plot_layer(rows: list[dict], env: dict, out_dir: str) -> list[str]:
    plt = _pyplot()
    paths = []
    shapes = sorted({(r["n_in"], r["n_out"], r["dtype"]) for r in rows})
    for n_in, n_out, dtype in shapes:
        by_method = defaultdict(list)
        for r in rows:
            if (r["n_in"], r["n_out"], r["dtype"]) == (n_in, n_out, dtype) and r.get("median_ms") is not None:
                by_method[r["method"]].append(r)
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
        for method, rs in by_method.items():
            rs.sort(key=lambda r: r["tokens"])
            tok = [r["tokens"] for r in rs]
            med = [r["median_ms"] for r in rs]
            err = [[m - r["q1_ms"] for m, r in zip(med, rs)], [r["q3_ms"] - m for m, r in zip(med, rs)]]
            style = "--" if method.startswith(("PEFT", "frozen")) else "-"
            ax_t.errorbar(tok, med, yerr=err, marker="o", linestyle=style, capsize=3, label=method)
            ax_m.plot(tok, [r["peak_mem_bytes"] / 2**20 for r in rs], marker="o", linestyle=style, label=method)
        ticks = sorted({r["tokens"] for rs in by_method.values() for r in rs})
        labels = ((ax_t, "forward+backward time, ms (median, IQR bars)"), (ax_m, "peak memory of a step, MiB"))
        for ax, ylabel in labels:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(_title(env, f"one FRoD layer {n_in}->{n_out}, {dtype}: lower is better"))
        fig.tight_layout()
        path = os.path.join(out_dir, f"layer_{n_in}x{n_out}_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_bars(rows: list[dict], env: dict, out_dir: str, suite: str) -> list[str]:
    rows = [r for r in rows if r.get("median_ms") is not None]
    if not rows:
        return []
    plt = _pyplot()
    mem_key = "peak_mem_bytes" if suite == "train" else "peak_extra_bytes"
    mem = [r.get(mem_key) for r in rows]
    panels = [("median_ms", "time, ms (median)")] + ([(mem_key, "peak memory, MiB")] if all(mem) else [])
    # wide enough for the method names beside the bars and for the title on two lines
    fig, axes = plt.subplots(1, len(panels), figsize=(7 + 5 * len(panels), 0.6 * len(rows) + 2.4), squeeze=False)
    names = [r["method"] for r in rows]
    for ax, (key, label) in zip(axes[0], panels):
        vals = [r[key] / (2**20 if key == mem_key else 1) for r in rows]
        bars = ax.barh(names, vals, color=[f"C{i}" for i in range(len(rows))])
        labels = [f"{v:.4g}" + (f" ({r['speedup_vs_peft']:.3g}x)" if key == "median_ms" and r.get("speedup_vs_peft")
                                and r.get("key") != "peft" else "") for v, r in zip(vals, rows)]
        ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
        if max(vals) > 20 * min(vals):
            # a cached setup is ~100x faster than PEFT's: on a linear axis its bar would be a hairline
            ax.set_xscale("log")
            ax.set_xlim(min(vals) / 2, max(vals) * 3)
            label += ", log scale"
        else:
            ax.margins(x=0.25)  # room for the value labels
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[0][1 if len(panels) > 1 else 0].tick_params(axis="y", labelleft=len(panels) == 1)
    r0 = rows[0]
    model = f"Llama hidden {r0['hidden_size']}, {r0['num_hidden_layers']} layers, {r0['dtype']}"
    what = (f"train step, {model}, {r0['tokens']} tokens, adapters on q_proj/v_proj" if suite == "train" else
            f"projection setup, {model}, q_proj/v_proj (speedup vs PEFT in brackets)")
    fig.suptitle(_title(env, what + ": lower is better"))
    fig.tight_layout()
    path = os.path.join(out_dir, f"{suite}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")  # never clip the title or the method names
    plt.close(fig)
    return [path]


def plot_all(results: dict, out_dir: str) -> list[str]:
    env, suites = results["environment"], results["suites"]
    paths = []
    if suites.get("layer"):
        paths += plot_layer(suites["layer"], env, out_dir)
    for suite in ("train", "init"):
        if suites.get(suite):
            paths += plot_bars(suites[suite], env, out_dir, suite)
    return paths
