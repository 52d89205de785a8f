"""frod_kernels.projections against PEFT 0.21's own construction (peft.tuners.frod), on small models built from
configs (nothing downloaded), and against float64 math where PEFT is not the reference."""

import warnings

import pytest
import torch
from torch import nn

from frod_kernels import projections as P
from frod_kernels.reference import eigenbasis_error, reference_frod_eigenproblem, rel_err

peft_frod_model = pytest.importorskip("peft.tuners.frod.model")
from peft import FrodConfig, get_peft_model  # noqa: E402
from peft.tuners.frod.layer import FrodLayer  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _peft_pattern(n, sparse_rate, generator):
    """PEFT's pattern code from FrodModel._init_frod_projections, verbatim (the n*n grid)."""
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    mask_indices = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    non_diag = mask_indices[mask_indices[:, 0] != mask_indices[:, 1]]
    nnz = min(int(n * n * sparse_rate), non_diag.shape[0])
    if sparse_rate > 0 and non_diag.shape[0] > 0:
        nnz = max(1, nnz)
    if nnz:
        perm = torch.randperm(non_diag.shape[0], generator=generator)[:nnz]
        return non_diag[perm].t().contiguous()
    return torch.empty(2, 0, dtype=torch.long)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp = nn.ModuleDict({"up": nn.Linear(d, 2 * d)})
        self.moe = nn.ModuleDict({"mlp": nn.ModuleDict({"up": nn.Linear(d, 2 * d)})})


class _OddKeys(nn.Module):
    """Keys that exercise PEFT's grouping corners: two keys of one category with the same layer index
    (blocks.i.mlp.up and blocks.i.moe.mlp.up), and a key without a digit (its fallback index)."""

    def __init__(self, d=24, n=2):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.head = nn.ModuleDict({"mlp": nn.ModuleDict({"up": nn.Linear(d, 2 * d)})})


def _model(kind):
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                          intermediate_size=80, vocab_size=32)
        return LlamaForCausalLM(cfg), ["q_proj", "v_proj", "down_proj"]
    if kind == "gpt2":  # Conv1D; mlp.c_proj (3 x 64 rows < 256 columns) takes PEFT's SVD route
        cfg = GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=32, n_positions=16)
        return GPT2LMHeadModel(cfg), ["c_attn", "c_proj"]
    model = _OddKeys()
    for p in model.parameters():  # fresh, not-too-regular weights
        nn.init.normal_(p, std=0.3)
    return model, ["up"]


def _targets(model, names):
    out = {}
    for key, mod in model.named_modules():
        if key.rsplit(".", 1)[-1] in names and isinstance(mod, (nn.Linear, Conv1D)):
            out[key] = (mod.weight.T if isinstance(mod, Conv1D) else mod.weight).detach().clone()
    return out


def _peft_tensors(model, names, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, FrodConfig(target_modules=names, progressbar=False, **cfg))
    base = pm.base_model
    V = {c: base.frod_V[c]["default"] for c in base.frod_V}
    S = {c: base.frod_s_indices[c]["default"] for c in base.frod_s_indices}
    U, lam = {}, {}
    for name, mod in pm.named_modules():
        if isinstance(mod, FrodLayer):
            key = name.removeprefix("base_model.model.")
            U[key], lam[key] = mod.frod_U["default"], mod.frod_lambda_l["default"].detach()
    return V, S, U, lam


@pytest.mark.parametrize("kind,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("odd", torch.float32),
                                        ("llama", torch.bfloat16)])
def test_matches_peft(kind, dtype):
    model, names = _model(kind)
    model = model.to(dtype)
    weights = _targets(model, names)
    cfg = dict(sparse_rate=0.05, projection_prng_key=int(torch.randint(0, 1000, ())), regularization_alpha=2e-3)
    ours = P.build_projections(weights, progressbar=False, **cfg)
    V, S, U, lam = _peft_tensors(model, names, **cfg)

    assert sorted(ours) == sorted(V)
    assert sorted(k for p in ours.values() for k in p.keys) == sorted(weights) == sorted(U)
    for name, proj in ours.items():
        # V: PEFT's float32 ops in PEFT's order, so bitwise (PEFT stores it in the weights' dtype).
        assert proj.V.dtype == torch.float32
        assert torch.equal(proj.V.to(dtype), V[name]), name
        assert torch.equal(proj.s_indices, S[name]), name
        for key in proj.keys:
            # A float64 solve against one factorization of V instead of one per layer: equal to float32 rounding.
            # PEFT keeps U in the weights' dtype (lambda_l in float32, its adapter autocast).
            assert rel_err(proj.U[key].to(U[key].dtype), U[key]) <= 1e-6, key
            assert rel_err(proj.lambda_l[key], lam[key]) <= 1e-6, key
            if dtype == torch.float32:
                rebuilt = (proj.U[key] * proj.lambda_l[key]) @ proj.V.T
                assert rel_err(rebuilt, weights[key]) <= 1e-5, key


def test_odd_keys_grouping_follows_peft():
    model, names = _model("odd")
    proj = P.build_projections(_targets(model, names), sparse_rate=0.1, progressbar=False)["mlp_up"]
    # Layer indices: blocks.0.* -> 0, blocks.1.* -> 1, head.mlp.up -> its fallback (position 4).
    assert proj.keys == ["blocks.0.mlp.up", "blocks.0.moe.mlp.up", "blocks.1.mlp.up", "blocks.1.moe.mlp.up",
                         "head.mlp.up"]
    # PEFT's per-layer dict keeps the last key of each index: V is built from the moe layers and the head only.
    expected = peft_frod_model._projection_from_weights(
        [model.blocks[0].moe.mlp.up.weight.detach(), model.blocks[1].moe.mlp.up.weight.detach(),
         model.head.mlp.up.weight.detach()], 1e-3)
    assert torch.equal(proj.V, expected)


@pytest.mark.parametrize("key,fallback", [
    ("model.layers.3.self_attn.q_proj", 7), ("encoder.layer.11.attention.self.query", 0),
    ("encoder.layer.2.attention.output.dense", 0), ("encoder.layer.2.output.dense", 0), ("transformer.h.5.attn.c_attn", 1),
    ("classifier.dense", 9), ("lm_head", 4), ("model.layers.x.mlp.up_proj", 2), ("model.layers", 3),
    ("blocks.0.experts.3", 5), ("vision_model.encoder.layers.0.self_attn.q_proj", 0), ("a.12.b.7.c", 0)])
def test_key_helpers_match_peft(key, fallback):
    assert P.category_from_key(key) == peft_frod_model._category_from_key(key)
    assert P.layer_index_from_key(key, fallback) == peft_frod_model._layer_index_from_key(key, fallback)


@pytest.mark.parametrize("n,sparse_rate", [
    (0, 0.5), (1, 0.5), (2, 0.1), (2, 1.0), (3, 0.0), (5, 0.01), (7, 0.5), (7, 1.0), (33, 0.03), (64, 0.99)])
def test_sparse_pattern_matches_peft(n, sparse_rate):
    # (2, 0.1): int(0.4) = 0 -> at least 1; (7, 1.0) and (64, 0.99): nnz capped at n(n-1); (3, 0.0): no draw.
    seed = int(torch.randint(0, 2**31, ()))
    g_ours, g_peft = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    ours = P.sparse_pattern(n, sparse_rate, g_ours)
    peft = _peft_pattern(n, sparse_rate, g_peft)
    assert ours.dtype == torch.int64 and ours.shape == peft.shape
    assert torch.equal(ours, peft)
    # Same generator consumption: the next draw (the next category's pattern in PEFT) agrees too.
    assert torch.equal(torch.randperm(50, generator=g_ours), torch.randperm(50, generator=g_peft))


def test_u_and_lambda_is_peft_layer_math():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    V = torch.randn(40, 40, generator=g)
    W = torch.randn(24, 40, generator=g)
    U, lam = P.u_and_lambda(V, W)
    U_peft, lam_peft = FrodLayer._calculate_frod_u_and_lambda(None, V, W)
    assert torch.equal(U, U_peft) and torch.equal(lam, lam_peft)
    assert rel_err(U.norm(dim=0), torch.ones(40)) <= 1e-6
    assert rel_err((U.double() * lam.double()) @ V.double().T, W.double()) <= 1e-5


def test_singular_basis_takes_peft_pinv_fallback():
    # A weight column that is zero in every layer makes R, hence V, exactly singular: PEFT's solve raises and it
    # falls back to pinv; the shared factorization must notice the same and do the same.
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    weights = {f"layers.{i}.proj": torch.randn(32, 16, generator=g) for i in range(3)}
    for w in weights.values():
        w[:, 5] = 0
    proj = P.build_projections(weights, progressbar=False)["proj"]
    for key, w in weights.items():
        U_peft, lam_peft = FrodLayer._calculate_frod_u_and_lambda(None, proj.V, w)
        assert rel_err(proj.U[key], U_peft) <= 1e-6 and rel_err(proj.lambda_l[key], lam_peft) <= 1e-6


def test_without_layers_and_progressbar(capsys):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    weights = {f"model.layers.{i}.self_attn.{n}": torch.randn(o, 20, generator=g)
               for i in range(2) for n, o in (("q_proj", 20), ("v_proj", 5))}
    full = P.build_projections(weights, progressbar=False)
    assert capsys.readouterr().err == ""
    bare = P.build_projections(weights, progressbar=True, with_layers=False)
    err = capsys.readouterr().err
    assert "self_attn_q_proj" in err and "self_attn_v_proj" in err and "width 20" in err and "2 layers" in err
    for name, proj in bare.items():
        assert proj.U == {} and proj.lambda_l == {}
        assert torch.equal(proj.V, full[name].V) and torch.equal(proj.s_indices, full[name].s_indices)


def test_bad_inputs_name_the_argument():
    w = {"layers.0.q": torch.randn(8, 8), "layers.1.q": torch.randn(8, 6)}
    with pytest.raises(ValueError, match="sparse_rate"):
        P.build_projections({"layers.0.q": torch.randn(8, 8)}, sparse_rate=1.5)
    with pytest.raises(ValueError, match="sparse_rate"):
        P.sparse_pattern(8, -0.1, torch.Generator())
    with pytest.raises(ValueError, match="weights"):
        P.build_projections({})
    with pytest.raises(ValueError, match=r"layers\.0\.q.*layers\.1\.q"):
        P.build_projections(w)
    with pytest.raises(ValueError, match="weights"):
        P.basis_from_weights([])
    with pytest.raises(ValueError, match="W"):
        P.u_and_lambda(torch.randn(8, 8), torch.randn(4, 6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_gpu_route():
    # cuSOLVER's float64 V need not be PEFT's column for column (see the module docstring); what must hold: the
    # pattern exactly, and U diag(lambda) V^T reproducing every weight.
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    weights = {f"model.layers.{i}.self_attn.{n}": 0.02 * torch.randn(o, 128, generator=g)
               for i in range(4) for n, o in (("q_proj", 128), ("v_proj", 32))}
    cpu = P.build_projections(weights, progressbar=False)
    gpu = P.build_projections({k: w.cuda() for k, w in weights.items()}, progressbar=False, device="cuda")
    for name, proj in gpu.items():
        assert proj.V.device.type == "cpu" and proj.V.dtype == torch.float32
        assert torch.equal(proj.s_indices, cpu[name].s_indices)
        # an eigenbasis of PEFT's problem at least as accurate as PEFT's float32 one (signs and near-equal
        # eigenvalues' bases are free)
        R, T = reference_frod_eigenproblem([weights[k] for k in proj.keys], 1e-3)
        exact, ours = eigenbasis_error(cpu[name].V, R, T), eigenbasis_error(proj.V, R, T)
        assert all(ours[m] <= 4 * exact[m] + 1e-6 for m in exact), (name, ours, exact)
        for key in proj.keys:
            rebuilt = (proj.U[key] * proj.lambda_l[key]) @ proj.V.T
            assert rel_err(rebuilt, weights[key]) <= 1e-5, key
