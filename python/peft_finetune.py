"""Fine-tune through PEFT's FRoD with frod-kernels' acceleration: one line, nothing else changes.

Builds a small Llama-style model from a config (nothing is downloaded), adds PEFT FRoD adapters on q_proj/v_proj,
and trains the same model from the same start twice on the same random-token batches: with PEFT's own forward,
and with ``frod_kernels.peft.accelerate(model)``, step by step in turn. Prints the loss and step time of both, step by step, and
checks that the accelerated run trained the same (the same loss at every step, to float32 rounding).

    python python/peft_finetune.py --steps 50
"""

import argparse
import copy
import statistics
import time

import torch
from peft import FrodConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import frod_kernels.peft as fkp


def build(hidden: int, layers: int, vocab: int, dropout: float):
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      vocab_size=vocab)
    torch.manual_seed(0)
    config = FrodConfig(target_modules=["q_proj", "v_proj"], sparse_rate=0.01, frod_dropout=dropout,
                        progressbar=False)
    return get_peft_model(LlamaForCausalLM(cfg), config)


def train(models, batches, seed: int = 0):
    """AdamW over ``batches`` for each model, the models' steps interleaved so that a busy machine slows them
    alike; each model gets its own copy of the RNG stream (the same dropout masks). Returns per model the losses
    and the seconds of each step."""
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3) for m in models]
    torch.manual_seed(seed)
    rng = [torch.get_rng_state() for _ in models]
    losses, times = [[] for _ in models], [[] for _ in models]
    for ids in batches:
        for k, (model, opt) in enumerate(zip(models, opts)):
            torch.set_rng_state(rng[k])
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            times[k].append(time.perf_counter() - t0)
            losses[k].append(loss.item())
            rng[k] = torch.get_rng_state()
    return losses, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per step (batch 4)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--dropout", type=float, default=0.0, help="PEFT's frod_dropout")
    args = ap.parse_args()
    if args.tokens < 8 or args.tokens % 4:
        ap.error(f"--tokens: expected a multiple of 4 (batch 4) of at least 8, got {args.tokens}")

    peft_model = build(args.hidden, args.layers, args.vocab, args.dropout)
    fast_model = copy.deepcopy(peft_model)
    fkp.accelerate(fast_model)  # the one line: this model's FRoD layers now run through frod_kernels
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    print(f"Llama-style model: hidden {args.hidden}, {args.layers} layers, {args.tokens} tokens/step, "
          f"{n_train:,} trainable FRoD parameters, torch threads {torch.get_num_threads()}")

    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (4, args.tokens // 4), generator=g) for _ in range(args.steps)]
    train([copy.deepcopy(peft_model), fkp.accelerate(copy.deepcopy(fast_model))], batches[:2])  # warm-up
    (ref_loss, fast_loss), (ref_t, fast_t) = train([peft_model, fast_model], batches)

    print(f"{'step':>4}  {'PEFT loss':>10}  {'accel. loss':>11}  {'PEFT ms':>8}  {'accel. ms':>9}")
    for i, (a, b, ta, tb) in enumerate(zip(ref_loss, fast_loss, ref_t, fast_t)):
        print(f"{i:>4}  {a:>10.5f}  {b:>11.5f}  {1e3 * ta:>8.1f}  {1e3 * tb:>9.1f}")
    med_ref, med_fast = statistics.median(ref_t), statistics.median(fast_t)
    worst = max(abs(a - b) / abs(a) for a, b in zip(ref_loss, fast_loss))
    print(f"median step: PEFT {1e3 * med_ref:.1f} ms, accelerated {1e3 * med_fast:.1f} ms "
          f"({med_ref / med_fast:.2f}x); fastest step: PEFT {1e3 * min(ref_t):.1f} ms, accelerated "
          f"{1e3 * min(fast_t):.1f} ms; largest relative loss difference {worst:.1e}")


if __name__ == "__main__":
    main()
