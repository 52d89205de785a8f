"""frod_kernels.peft: checkpoints interoperate with plain PEFT both ways, and enable()'s projection setup gives
PEFT's tensors."""

import copy

import pytest
import torch
from peft import FrodConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import frod_kernels.peft as fkp
from frod_kernels.reference import rel_err
from peft_helpers import TinyNet, trainables


@pytest.fixture(autouse=True)
def _back_to_peft():
    yield
    fkp.disable()


def _train(model, x, steps=3):
    opt = torch.optim.AdamW(trainables(model).values(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("trained_accelerated", [True, False])
def test_checkpoint_round_trip(tmp_path, save_projection, trained_accelerated):
    """Trained with (without) acceleration, saved, loaded without (with) it: the same outputs."""
    torch.manual_seed(0)
    net = TinyNet()
    base_state = copy.deepcopy(net.state_dict())
    config = FrodConfig(target_modules=["q_proj", "v_proj"], sparse_rate=0.1, save_projection=save_projection,
                        bias="frod_only", progressbar=False)
    x = torch.randn(2, 5, 32)
    if trained_accelerated:
        fkp.enable()
    model = get_peft_model(net, config)
    _train(model, x)
    model.save_pretrained(tmp_path)

    if trained_accelerated:
        fkp.disable()
    else:
        fkp.enable()  # the loader's projection setup (save_projection=False) also runs accelerated
    fresh = TinyNet()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    fkp.disable()
    y = {}
    for name, m in (("trained", model), ("loaded", loaded)):
        m.eval()
        for accelerated in (False, True):
            fkp.accelerate(m, enabled=accelerated)
            with torch.no_grad():
                y[name, accelerated] = m(x)
    # the loaded model holds the trained tensors (or rebuilt the same projections): bitwise the same outputs
    assert torch.equal(y["loaded", False], y["trained", False])
    assert torch.equal(y["loaded", True], y["trained", True])
    assert rel_err(y["loaded", True], y["loaded", False]) <= 1e-5
    for name, p in trainables(model).items():
        assert torch.equal(dict(loaded.named_parameters())[name], p), name


def _llama():
    cfg = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg), ["q_proj", "v_proj", "down_proj"]  # down_proj: fewer rows than columns (SVD)


def _gpt2():
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    return GPT2LMHeadModel(cfg), ["c_attn", "c_fc"]


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2_conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_enable_projection_setup_gives_peft_tensors(build, dtype, monkeypatch):
    torch.manual_seed(0)
    net, targets = build()
    net = net.to(dtype)
    config = dict(target_modules=targets, sparse_rate=0.05, projection_prng_key=7, progressbar=False)
    with pytest.warns(UserWarning) if build is _gpt2 else _nothing():
        plain = get_peft_model(copy.deepcopy(net), FrodConfig(**config))
    calls = []
    real = fkp.setup.projections.build_projections
    monkeypatch.setattr(fkp.setup.projections, "build_projections", lambda *a, **k: calls.append(1) or real(*a, **k))
    solvers = []
    real_solver = fkp.setup.projections.VSolver
    monkeypatch.setattr(fkp.setup.projections, "VSolver", lambda *a: solvers.append(1) or real_solver(*a))
    fkp.enable()
    with pytest.warns(UserWarning) if build is _gpt2 else _nothing():
        fast = get_peft_model(copy.deepcopy(net), FrodConfig(**config))
    assert calls, "enable() did not route PEFT's projection setup through frod_kernels.projections"
    assert len(solvers) == len(targets), "U and lambda_l: not one factorization of V per category"
    a, b = plain.state_dict(keep_vars=True), fast.state_dict(keep_vars=True)
    proj_keys = [k for k in a if any(s in k for s in ("frod_V", "frod_s_indices", "frod_s_size"))]
    assert proj_keys and a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for (n, m), (_, m2) in zip(plain.named_modules(), fast.named_modules()):
        if hasattr(m, "frod_U") and "default" in getattr(m, "frod_U", {}):
            assert torch.equal(m.frod_U["default"], m2.frod_U["default"]), n


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
