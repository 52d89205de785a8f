"""Drop-in FRoD without PEFT: replace a model's linear layers with FrodLinear and train only FRoD's parameters.

Builds a small Llama-style model from a config (nothing is downloaded), swaps q_proj/v_proj for FrodLinear (the
same V, U, lambda_l and pattern PEFT's FRoD would build), checks the swap kept the model's output, trains a few
steps on random tokens, saves the state dict with safetensors and loads it back.

    python python/drop_in_replacement.py --steps 20
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import LlamaConfig, LlamaForCausalLM

import frod_kernels as fk


def build(hidden: int, layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=1024)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per step (batch 4)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sparse-rate", type=float, default=0.01)
    args = ap.parse_args()

    model = build(args.hidden, args.layers)
    ids = torch.randint(0, 1024, (4, args.tokens // 4))
    with torch.no_grad():
        before = model(ids).logits

    # freezes everything else, as get_peft_model does: only FRoD's lambda_l and s_values train
    fk.replace_linears(model, ["q_proj", "v_proj"], sparse_rate=args.sparse_rate, seed=0)
    with torch.no_grad():
        drift = (model(ids).logits - before).norm() / before.norm()
    print(f"output change after the swap: {drift:.1e} (FRoD starts exactly at the base model)")

    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,}")
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step:3d}  loss {loss.item():.4f}  {1e3 * (time.perf_counter() - t0):7.1f} ms")

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "frod.safetensors"
        save_model(model, str(path))  # the shared V of each category is written once
        again = fk.replace_linears(build(args.hidden, args.layers), ["q_proj", "v_proj"], progressbar=False)
        load_model(again, str(path))
        with torch.no_grad():
            same = torch.equal(again(ids).logits, model(ids).logits)
        print(f"reloaded from {path.name}: identical outputs = {same}")


if __name__ == "__main__":
    main()
