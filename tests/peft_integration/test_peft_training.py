"""frod_kernels.peft: 50 AdamW steps of a small Llama-style model give PEFT's loss at every step (fp32)."""

import copy

import torch
from peft import FrodConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import frod_kernels.peft as fkp
from frod_kernels.reference import rel_err
from peft_helpers import trainables


def _losses(model, batches, accelerated):
    fkp.accelerate(model, enabled=accelerated)
    opt = torch.optim.AdamW(trainables(model).values(), lr=1e-2)
    losses = []
    for ids in batches:
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    fkp.accelerate(model, enabled=False)
    return torch.tensor(losses, dtype=torch.float64)


def test_fifty_adamw_steps_match_peft():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    model = get_peft_model(LlamaForCausalLM(cfg), FrodConfig(target_modules=["q_proj", "v_proj"], sparse_rate=0.05,
                                                             frod_dropout=0.1, progressbar=False))
    accelerated = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in trainables(model).items()}
    batches = [torch.randint(0, 128, (2, 32))] * 50  # one batch: the loss must fall as it is learnt
    torch.manual_seed(1)  # the same dropout masks in both runs
    ref = _losses(model, batches, False)
    torch.manual_seed(1)
    got = _losses(accelerated, batches, True)
    assert torch.isfinite(got).all() and ref[-1] < ref[0]  # it trains
    rel = ((got - ref).abs() / ref.abs()).max().item()
    assert rel <= 1e-4, f"largest per-step relative loss difference {rel:.2e}"
    # Compared as whole updates, not elementwise: Adam divides by the root of the squared gradient, so an entry
    # whose gradient is rounding noise moves by about lr either way in both runs; the update as a whole must agree.
    final = {n: p for n, p in trainables(accelerated).items()}
    for n, p in trainables(model).items():
        err = rel_err(final[n] - start[n], p.detach() - start[n])
        assert err <= 1e-3, f"{n}: the accelerated update differs by {err:.1e}"
