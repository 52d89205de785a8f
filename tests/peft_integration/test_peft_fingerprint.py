"""frod_kernels.peft: an adapter saved without its projections records their fingerprint, and a load whose
regenerated projections differ warns (ProjectionMismatchWarning) instead of silently training on another basis,
while loading exactly what PEFT loads."""

import copy
import json
import os
import warnings

import pytest
import torch
from peft import FrodConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import frod_kernels.peft as fkp
from frod_kernels.peft import fingerprint
from frod_kernels.peft.fingerprint import SIDECAR_NAME
from frod_kernels.peft import ProjectionMismatchWarning
from frod_kernels.reference import rel_err


@pytest.fixture(autouse=True)
def _back_to_peft():
    yield
    fkp.disable()


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _base():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg).eval()


def _saved(tmp_path, save_projection=False, accelerated=True):
    """(base weights, checkpoint directory, logits of the saving model) of an adapter with random trained-like
    values; the logits come from the saving model's forward, fused when ``accelerated``."""
    net = _base()
    base_state = copy.deepcopy(net.state_dict())
    if accelerated:
        fkp.enable()
    model = get_peft_model(net, FrodConfig(target_modules=["q_proj", "v_proj"], sparse_rate=0.1, init_weights=False,
                                           save_projection=save_projection, projection_prng_key=3,
                                           progressbar=False))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        y = model(IDS).logits
    fkp.disable()
    return base_state, tmp_path, y


def _load(base_state, path, perturb=None, **kwargs):
    net = _base()
    net.load_state_dict(base_state)
    if perturb is not None:
        with torch.no_grad():
            w = net.get_submodule(perturb).weight
            w.add_(1e-2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2)))
    return PeftModel.from_pretrained(net, path, **kwargs).eval()


def test_same_base_reloads_and_gives_the_same_outputs(tmp_path, recwarn):
    base_state, path, y = _saved(tmp_path)
    record = json.loads((path / SIDECAR_NAME).read_text())
    assert set(record["categories"]) == {"self_attn_q_proj", "self_attn_v_proj"} and len(record["layers"]) == 4
    fkp.enable()
    loaded = _load(base_state, path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, y)
    assert not [w for w in recwarn if "FRoD" in str(w.message)]


def _mismatch(record) -> str:
    """The one ProjectionMismatchWarning's message among the recorded warnings."""
    found = [str(w.message) for w in record if issubclass(w.category, ProjectionMismatchWarning)]
    assert len(found) == 1, f"expected one ProjectionMismatchWarning, got {len(found)}"
    return found[0]


def test_other_base_weights_warn_naming_category_and_layer(tmp_path):
    base_state, path, _ = _saved(tmp_path)
    fkp.enable()
    with pytest.warns(ProjectionMismatchWarning) as record:
        _load(base_state, path, perturb="model.layers.1.self_attn.q_proj")
    msg = _mismatch(record)
    assert str(path) in msg and "category 'self_attn_q_proj': V differs" in msg
    assert "layer 'model.layers.1.self_attn.q_proj'" in msg and "U differs" in msg
    assert "v_proj" not in msg, "an untouched category was reported"
    assert "base model weights" in msg and "simplefilter('error'" in msg


def test_mismatch_is_an_error_when_asked(tmp_path):
    base_state, path, _ = _saved(tmp_path)
    fkp.enable()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProjectionMismatchWarning)
        with pytest.raises(ProjectionMismatchWarning, match="U differs"):
            _load(base_state, path, perturb="model.layers.0.self_attn.q_proj")


def test_other_projection_prng_key_warns_naming_the_pattern(tmp_path):
    base_state, path, _ = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "projection_prng_key": 4}))
    fkp.enable()
    with pytest.warns(ProjectionMismatchWarning, match="sparse pattern s_indices differs") as record:
        _load(base_state, path)
    msg = _mismatch(record)
    assert "V differs" not in msg and "projection_prng_key" in msg


def test_accelerated_model_checks_load_adapter(tmp_path):
    """accelerate(model) (not enable()) also covers a later load_adapter; the second adapter reuses the projections
    the first one built from other base weights, so it does not match its own checkpoint."""
    base_state, path, _ = _saved(tmp_path)
    loaded = _load(base_state, path, perturb="model.layers.0.self_attn.v_proj")  # plain PEFT: not verified
    fkp.accelerate(loaded)
    with pytest.warns(ProjectionMismatchWarning, match="category 'self_attn_v_proj': V differs"):
        loaded.load_adapter(path, "again")


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("save_projection", [True, False])
def test_loading_onto_other_base_weights_is_what_peft_loads(tmp_path, save_projection, is_trainable):
    """PEFT loads an adapter onto any base model of the right shapes (its own test suite does, with fresh random
    weights). Accelerated, the same load succeeds with the same parameters, the same trainability, and outputs
    and gradients within float32 rounding of PEFT's, only with a warning that the projections moved."""
    base_state, path, _ = _saved(tmp_path, save_projection=save_projection)
    other = {k: v + 0.05 * torch.randn_like(v) if v.dim() == 2 else v for k, v in base_state.items()}

    def load(accelerated):
        if accelerated:
            fkp.enable()
        try:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                model = _load(other, path, is_trainable=is_trainable)
                model.load_adapter(path, "second", is_trainable=not is_trainable)
        finally:
            fkp.disable()
        return model, [w for w in record if issubclass(w.category, ProjectionMismatchWarning)]

    plain, plain_warned = load(False)
    fast, fast_warned = load(True)
    assert not plain_warned and fast_warned
    a, b = dict(plain.named_parameters()), dict(fast.named_parameters())
    assert a.keys() == b.keys()
    assert {n for n, p in a.items() if p.requires_grad} == {n for n, p in b.items() if p.requires_grad}
    assert any(p.requires_grad for p in a.values())
    for name in a:
        assert rel_err(b[name], a[name]) <= 1e-5, name
    outs = []
    for model, accelerated in ((plain, False), (fast, True)):
        fkp.accelerate(model, enabled=accelerated)
        model.train(is_trainable)
        logits = model(IDS).logits
        # the active adapter trains only when loaded trainable (the other one is inactive)
        active = [p for n, p in model.named_parameters() if p.requires_grad and ".default" in n]
        outs.append((logits.detach(), torch.autograd.grad(logits.square().mean(), active) if active else ()))
    assert bool(outs[0][1]) == is_trainable
    assert rel_err(outs[1][0], outs[0][0]) <= 1e-5
    for g_fast, g_plain in zip(outs[1][1], outs[0][1]):
        assert rel_err(g_fast, g_plain) <= 1e-5


def test_missing_or_stale_sidecar_warns(tmp_path):
    base_state, path, y = _saved(tmp_path)
    os.remove(path / SIDECAR_NAME)
    fkp.enable()
    with pytest.warns(UserWarning, match="cannot be verified"):
        loaded = _load(base_state, path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, y)

    # a later save without acceleration leaves an older sidecar behind: recognized as stale, not trusted
    stale = tmp_path / "stale"
    _, stale, _ = _saved(stale)
    sidecar = (stale / SIDECAR_NAME).read_text()
    _, stale, _ = _saved(stale, accelerated=False)
    assert (stale / SIDECAR_NAME).read_text() == sidecar
    with torch.no_grad():
        next(p for n, p in loaded.named_parameters() if "lambda_l" in n).add_(1.0)
    fkp.disable()
    loaded.save_pretrained(stale)
    fkp.enable()
    with pytest.warns(UserWarning, match="stale"):
        _load(base_state, stale)


def test_plain_peft_loads_a_checkpoint_with_sidecar(tmp_path):
    """Plain PEFT ignores the sidecar. Its forward is not the fused one that computed ``y``, so the outputs agree to
    float32 rounding (docs/DESIGN.md section 5), not bitwise: the two sum in other orders, and BLAS picks its kernels by
    machine."""
    base_state, path, y = _saved(tmp_path)
    assert (path / SIDECAR_NAME).is_file()
    loaded = _load(base_state, path)
    with torch.no_grad():
        assert rel_err(loaded(IDS).logits, y) <= 1e-5


def test_save_projection_true_checks_u(tmp_path):
    """With save_projection=True, V and the pattern come from the checkpoint but PEFT computes U before loading them,
    from the V it regenerated: with other base weights U silently disagrees with the loaded V."""
    base_state, path, y = _saved(tmp_path, save_projection=True)
    fkp.enable()
    with torch.no_grad():
        assert torch.equal(_load(base_state, path)(IDS).logits, y)
    with pytest.warns(ProjectionMismatchWarning) as record:
        _load(base_state, path, perturb="model.layers.0.self_attn.q_proj")
    msg = _mismatch(record)
    # the untouched layer 1 q_proj: its U comes from a regenerated V that is not the V loaded
    assert "layer 'model.layers.1.self_attn.q_proj'" in msg
    assert "V differs" not in msg and "pattern" not in msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sketch_tolerates_rounding_but_not_a_flipped_column(dtype):
    """Another machine's rounding of the same V passes; one eigenvector with its sign flipped (which changes what
    the trained S entries mean) fails."""
    n = 256
    V = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0]
    noise = 1 + 2 * torch.finfo(torch.float32).eps * torch.randn(n, n, generator=torch.Generator().manual_seed(6),
                                                                  dtype=torch.float64)

    def fp(M):
        return {"categories": {"c": {"in_features": n, "nnz": 0, "dtype": str(dtype)[6:], "s_indices_sha256": "",
                                     "V_sketch": fingerprint.sketch(M.to(dtype))}}, "layers": {}}

    assert fingerprint.compare(fp(V), fp(V * noise)) == []
    flipped = V.clone()
    flipped[:, 17] *= -1
    assert "V differs" in fingerprint.compare(fp(V), fp(flipped))[0]
