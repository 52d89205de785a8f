"""PEFT's naming of a FRoD module: the category whose layers share V and the pattern, and the layer index that orders
the category's weights."""

from __future__ import annotations


def category_from_key(key: str) -> str:
    """PEFT's ``_category_from_key``: the projection-sharing role of a dotted module key.

    ``model.layers.3.self_attn.q_proj`` -> ``self_attn_q_proj``; ``h.0.attn.c_attn`` -> ``attn_c_attn``;
    ``...layers.0.2`` style keys (second-to-last part a digit) -> the last part; BERT's
    ``attention.output.dense`` -> ``attention_output``.
    """
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category

def layer_index_from_key(key: str, fallback: int) -> int:
    """PEFT's ``_layer_index_from_key``: the integer after a ``layers`` part, else the first integer part, else
    ``fallback``."""
    parts = key.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            pass
    for part in parts:
        if part.isdigit():
            return int(part)
    return fallback
