"""FrodLinear and replace_linears: drop-in behaviour, sharing, training semantics, state dicts, parity with PEFT."""

import pytest
import torch
from torch import nn

import frod_kernels as fk
from frod_kernels.reference import dense_s, rel_err


def tiny_llama(hidden=48, layers=2, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def test_fresh_layer_reproduces_its_base_layer():
    lin = nn.Linear(40, 56)
    layer = fk.FrodLinear.from_linear(lin, sparse_rate=0.05, seed=3)
    x = torch.randn(4, 9, 40)
    assert rel_err(layer(x), lin(x)) <= 1e-5
    assert layer.s_indices.shape == (2, int(40 * 40 * 0.05))


def test_fresh_layer_reproduces_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 40)  # nf=out=24, nx=in=40: weight stored (in, out)
    nn.init.normal_(conv.bias)
    layer = fk.FrodLinear.from_linear(conv, sparse_rate=0.02)
    x = torch.randn(3, 40)
    assert rel_err(layer(x), conv(x)) <= 1e-5
    assert layer.merged_weight().shape == conv.weight.shape  # merged weight in the base layer's orientation


def test_only_lambda_and_s_values_train_and_base_is_untouched():
    lin = nn.Linear(32, 32)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    layer = fk.FrodLinear.from_linear(lin)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lambda_l", "s_values"}
    assert {n for n, p in fk.FrodLinear.from_linear(lin, train_bias=True).named_parameters()
            if p.requires_grad} == {"lambda_l", "s_values", "bias"}
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(torch.randn(5, 32)).square().sum().backward()
    opt.step()
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k]), f"the base layer's {k} changed"


def test_trained_layer_matches_the_float64_reference_and_merged_weight():
    layer = fk.FrodLinear.from_linear(nn.Linear(36, 20), sparse_rate=0.1)
    with torch.no_grad():
        layer.s_values.normal_()
        layer.lambda_l.mul_(1 + 0.1 * torch.randn(36))
    x = torch.randn(6, 36, dtype=torch.float64)
    S = dense_s(layer.s_values, layer.s_indices, 36)
    W = layer.U.double() @ (torch.diag(layer.lambda_l.double()) + S) @ layer.V.double().t()
    ref = x @ W.t() + layer.bias.double()
    assert rel_err(layer(x.float()), ref) <= 1e-5
    assert rel_err(layer.merged_weight(), W) <= 1e-5


def test_a_layer_follows_optimizer_steps_and_conversions():
    # each call after the first reuses what the first checked (ops/api.py): an optimizer step, a dtype conversion
    # (which swaps the parameters' storages in place) and a new bias must all be seen
    torch.manual_seed(0)
    layer = fk.FrodLinear.from_linear(nn.Linear(16, 12), sparse_rate=0.1, cache=False)
    opt = torch.optim.SGD([layer.lambda_l, layer.s_values], lr=0.1)

    def reference(x):
        S = dense_s(layer.s_values, layer.s_indices, 16)
        W = layer.U.double() @ (torch.diag(layer.lambda_l.double()) + S) @ layer.V.double().t()
        return x.double() @ W.t() + layer.bias.double()

    for _ in range(3):
        x = torch.randn(8, 16)
        y = layer(x)
        assert rel_err(y, reference(x)) <= 1e-5
        y.square().sum().backward()
        opt.step()
        opt.zero_grad()
    layer.double()
    x = torch.randn(8, 16, dtype=torch.float64)
    assert layer(x).dtype == torch.float64 and rel_err(layer(x), reference(x)) <= 1e-10
    layer.bias = nn.Parameter(torch.randn(12, dtype=torch.float64))
    assert rel_err(layer(x), reference(x)) <= 1e-10


def test_dropout_follows_peft_semantics():
    lin = nn.Linear(24, 16)
    layer = fk.FrodLinear.from_linear(lin, dropout=0.3).train()
    with torch.no_grad():
        layer.s_values.normal_()
    x = torch.randn(8, 24)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    h = nn.functional.dropout(x, 0.3, training=True)
    w_new = layer.merged_weight().double()
    ref = x.double() @ lin.weight.double().t() + lin.bias.double() + h.double() @ (w_new - lin.weight.double()).t()
    assert rel_err(y, ref) <= 1e-5
    layer.eval()
    assert rel_err(layer(x), x.double() @ w_new.t() + lin.bias.double()) <= 1e-5


def test_replace_linears_shares_one_basis_per_category():
    model = tiny_llama()
    fk.replace_linears(model, ["q_proj", "v_proj"], sparse_rate=0.02, progressbar=False)
    layers = model.model.layers
    q0, q1, v0 = layers[0].self_attn.q_proj, layers[1].self_attn.q_proj, layers[0].self_attn.v_proj
    assert isinstance(q0, fk.FrodLinear) and isinstance(v0, fk.FrodLinear)
    assert q0.basis is q1.basis and q0.V is q1.V and q0.basis is not v0.basis
    assert isinstance(layers[0].self_attn.k_proj, nn.Linear)
    model.to(torch.float64)
    assert q0.V is q1.V and q0.V.dtype == torch.float64  # still one tensor after a move
    assert sum(1 for m in model.modules() if isinstance(m, fk.FrodBasis)) == 2


@pytest.mark.parametrize("freeze_base, train_bias", [(True, False), (True, True), (False, False)])
def test_replace_linears_trains_only_the_adapter_like_peft(freeze_base, train_bias):
    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj.bias = nn.Parameter(torch.randn(48))
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    fk.replace_linears(model, ["q_proj", "v_proj"], progressbar=False, freeze_base=freeze_base,
                       train_bias=train_bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n in trainable if n.endswith((".lambda_l", ".s_values"))}
    assert len(adapter) == 2 * 2 * 2  # lambda_l and s_values of q_proj and v_proj in both layers
    if freeze_base:
        bias = {"model.layers.0.self_attn.q_proj.bias"} if train_bias else set()
        assert trainable == adapter | bias
    else:
        kept = {n for n in before if not n.endswith(("q_proj.weight", "v_proj.weight", "q_proj.bias"))}
        assert trainable == adapter | kept and kept


def test_replace_linears_keeps_the_model_output():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        before = model(ids).logits
        fk.replace_linears(model, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], progressbar=False)
        after = model(ids).logits
    assert rel_err(after, before) <= 1e-5


def test_replace_linears_equals_peft_projections():
    from peft import FrodConfig, get_peft_model

    cfg = dict(target_modules=["q_proj", "v_proj"], sparse_rate=0.03, projection_prng_key=5)
    peft_model = get_peft_model(tiny_llama(), FrodConfig(progressbar=False, **cfg))
    ours = fk.replace_linears(tiny_llama(), cfg["target_modules"], sparse_rate=0.03, seed=5, progressbar=False)
    for i in range(2):
        for name in ("q_proj", "v_proj"):
            p = getattr(peft_model.base_model.model.model.layers[i].self_attn, name)
            o = getattr(ours.model.layers[i].self_attn, name)
            assert torch.equal(o.s_indices, p.frod_s_indices["default"])
            assert rel_err(o.V, p.frod_V["default"]) <= 1e-6
            assert rel_err(o.U, p.frod_U["default"]) <= 1e-5
            assert rel_err(o.lambda_l, p.frod_lambda_l["default"]) <= 1e-5


def test_state_dict_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_model, save_model

    model = tiny_llama()
    fk.replace_linears(model, ["q_proj", "v_proj"], sparse_rate=0.05, progressbar=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, fk.FrodLinear):
                m.s_values.normal_()
    ids = torch.randint(0, 97, (2, 7))
    expected = model(ids).logits
    save_model(model, tmp_path / "m.safetensors")

    other = tiny_llama()
    fk.replace_linears(other, ["q_proj", "v_proj"], sparse_rate=0.05, seed=99, progressbar=False)
    load_model(other, tmp_path / "m.safetensors")
    assert torch.equal(other(ids).logits, expected)  # the pattern (and its cached layout) came from the file


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="Embedding"):
        fk.FrodLinear.from_linear(nn.Embedding(5, 4))
    with pytest.raises(ValueError, match="sparse_rate"):
        fk.FrodLinear.from_linear(nn.Linear(4, 4), sparse_rate=1.5)
    with pytest.raises(ValueError, match="dropout"):
        fk.FrodLinear.from_linear(nn.Linear(4, 4), dropout=1.0)
    with pytest.raises(ValueError, match="V"):
        fk.FrodLinear.from_linear(nn.Linear(4, 4), V=torch.eye(5))
    with pytest.raises(ValueError, match="target_modules"):
        fk.replace_linears(tiny_llama(), ["nothing_here"], progressbar=False)
    with pytest.raises(TypeError, match="target_modules"):
        fk.replace_linears(tiny_llama(), ["embed_tokens"], progressbar=False)
