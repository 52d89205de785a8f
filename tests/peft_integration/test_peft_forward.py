"""frod_kernels.peft: accelerated PEFT FRoD layers give PEFT's outputs and gradients, in every PEFT behaviour.

Each test runs the same PEFT model with and without acceleration (fp32: relative 1e-5 on the output and on the
gradients of the input, lambda_l, s_values and every other trainable parameter), on fresh random inputs and with
``init_weights=False`` (nonzero s_values) unless the test is about the default init.
"""

import pytest
import torch
from peft import FrodConfig
from peft.tuners.frod.layer import Linear as PeftFrodLinear
from transformers import GPT2Config, GPT2LMHeadModel

import frod_kernels.peft as fkp
from frod_kernels.reference import TOLERANCE, rel_err
from peft_helpers import CountFused, TinyNet, assert_same, run, tiny_peft

N_FROD = 4  # FRoD layers in tiny_peft's default model: q_proj and v_proj of two blocks


@pytest.fixture(autouse=True)
def _back_to_peft():
    yield
    fkp.disable()


def _x(dtype=torch.float32, hidden=32):
    return torch.randn(3, 5, hidden, dtype=dtype)


def test_fused_path_runs_without_sparse_tensors(monkeypatch):
    model = tiny_peft(frod_dropout=0.2)
    count = CountFused(monkeypatch)

    def no_sparse(*args, **kwargs):
        raise AssertionError("PEFT's per-forward sparse COO tensor was built on the accelerated path")

    monkeypatch.setattr(torch, "sparse_coo_tensor", no_sparse)
    fkp.accelerate(model)
    for training in (True, False):  # dropout active (base layer kept) and inactive (base layer skipped)
        model.train(training)
        model(_x()).square().sum().backward()
    assert count.calls == 2 * N_FROD
    fkp.accelerate(model, enabled=False)
    with pytest.raises(AssertionError, match="sparse COO"):
        model(_x())


@pytest.mark.parametrize("config", [
    {"bias": "none"},
    {"bias": "all"},
    {"bias": "frod_only"},
    {"init_weights": True},
    {"frod_dropout": 0.25},
    {"frod_dropout": 0.25, "bias": "all"},
    {"save_projection": False},
    {"runtime_offload_base_weight": True},
    {"modules_to_save": ["head"]},
    {"sparse_rate": 0.0},
], ids=str)
def test_matches_peft(config, monkeypatch):
    model = tiny_peft(**config)
    count = CountFused(monkeypatch)
    assert_same(model, _x())
    assert count.calls == N_FROD


def test_dropout_in_eval_skips_base_layer_like_peft(monkeypatch):
    model = tiny_peft(frod_dropout=0.25)
    model.eval()
    base = model.base_model.model.layers[0].q_proj.base_layer
    calls = []
    base.register_forward_hook(lambda *a: calls.append(1))
    y = assert_same(model, _x())
    assert not calls and torch.isfinite(y).all()


def test_layers_bias_free():
    assert_same(tiny_peft(bias=False), _x())


def test_layers_to_transform(monkeypatch):
    model = tiny_peft(layers_to_transform=[1], layers_pattern="layers")
    count = CountFused(monkeypatch)
    assert_same(model, _x())
    assert count.calls == 2


def test_gpt2_conv1d_fan_in_fan_out(monkeypatch):
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    from peft import get_peft_model

    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # PEFT sets it for Conv1D and says so
        model = get_peft_model(GPT2LMHeadModel(cfg), FrodConfig(target_modules=["c_attn", "c_proj"],
                               sparse_rate=0.1, init_weights=False, frod_dropout=0.1, progressbar=False))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, PeftFrodLinear) and layer.fan_in_fan_out
    count = CountFused(monkeypatch)
    for training in (True, False):
        model.train(training)
        assert_same(model, _x(), call=lambda x: model(inputs_embeds=x).logits)
    assert count.calls == 2 * 2 * 3  # train/eval x 2 blocks x (c_attn, attn.c_proj, mlp.c_proj)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_half_precision_models(dtype, autocast_adapter_dtype, monkeypatch):
    # Reference: the same PEFT model in float64. The accelerated model must stay within the dtype's tolerance of
    # it (it computes in x's dtype with float32 accumulation, like PEFT, but keeps float32 adapter values).
    model = tiny_peft(dtype, autocast_adapter_dtype=autocast_adapter_dtype, frod_dropout=0.25)
    lam = model.base_model.model.layers[0].q_proj.frod_lambda_l["default"]
    assert lam.dtype == (torch.float32 if autocast_adapter_dtype else dtype)
    x = _x(dtype)
    count = CountFused(monkeypatch)
    y1, dx1, g1 = run(model, x, True)
    assert count.calls == N_FROD and y1.dtype == dtype
    model.double()
    y0, dx0, g0 = run(model, x.double(), False)
    tol = TOLERANCE[dtype]
    assert rel_err(y1, y0) <= tol and rel_err(dx1, dx0) <= tol
    for n in g0:
        assert g1[n].dtype == (torch.float32 if autocast_adapter_dtype else dtype)
        assert rel_err(g1[n], g0[n]) <= tol, n


def test_several_adapters(monkeypatch):
    model = tiny_peft()
    model.add_adapter("other", FrodConfig(target_modules=["q_proj", "v_proj"], sparse_rate=0.1, init_weights=False,
                                          progressbar=False))
    count = CountFused(monkeypatch)
    ys = {}
    for name in ("other", "default"):
        model.set_adapter(name)
        ys[name] = assert_same(model, _x())
    assert count.calls == 2 * N_FROD

    # two active adapters: PEFT's forward (base layer plus each delta) runs, not the fused one
    model.base_model.set_adapter(["default", "other"])
    count.calls = 0
    assert_same(model, _x())
    assert count.calls == 0


def test_adapter_added_after_accelerate_is_covered(monkeypatch):
    model = tiny_peft()
    fkp.accelerate(model)
    model.add_adapter("later", FrodConfig(target_modules=["o_proj"], sparse_rate=0.1, init_weights=False,
                                          progressbar=False))
    model.set_adapter("later")
    count = CountFused(monkeypatch)
    model(_x())
    assert count.calls == 2  # the two o_proj layers the new adapter created


def test_enable_covers_models_built_later_and_disable_restores_peft(monkeypatch):
    peft_forward = PeftFrodLinear.forward
    fkp.enable()
    assert fkp.is_enabled() and PeftFrodLinear.forward is not peft_forward
    model = tiny_peft()
    count = CountFused(monkeypatch)
    model(_x())
    assert count.calls == N_FROD
    fkp.disable()
    assert not fkp.is_enabled() and PeftFrodLinear.forward is peft_forward
    model(_x())
    assert count.calls == N_FROD


def test_accelerate_is_per_model(monkeypatch):
    a, b = tiny_peft(), tiny_peft()
    assert fkp.accelerate(a) is a
    count = CountFused(monkeypatch)
    b(_x())
    assert count.calls == 0
    a(_x())
    assert count.calls == N_FROD


def test_accelerate_rejects_bad_input():
    with pytest.raises(TypeError, match="model"):
        fkp.accelerate("not a model")
    with pytest.raises(ValueError, match="no PEFT FRoD layer"):
        fkp.accelerate(TinyNet())


def test_disable_adapter_merge_unmerge(monkeypatch):
    model = tiny_peft()
    x = _x()
    net = TinyNet()
    net.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.base_model.model.state_dict().items()
                         if "frod_" not in k})
    count = CountFused(monkeypatch)
    y_adapted = assert_same(model, x)
    fkp.accelerate(model)
    count.calls = 0
    with model.disable_adapter(), torch.no_grad():
        assert rel_err(model(x), net(x)) <= 1e-6
    assert count.calls == 0

    model.base_model.merge_adapter()
    with torch.no_grad():
        assert rel_err(model(x), y_adapted) <= 1e-5
    assert count.calls == 0  # merged: the base layer holds W'
    model.base_model.unmerge_adapter()
    with torch.no_grad():
        assert rel_err(model(x), y_adapted) <= 1e-5
    assert count.calls == N_FROD


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_merge_and_unload_and_unload(how):
    model = tiny_peft()
    x = _x()
    fkp.accelerate(model)
    with torch.no_grad():
        y_adapted = model(x)
        y_base = model.base_model.model.layers[0].q_proj.base_layer(x)
        plain = getattr(model, how)()
        assert not any(isinstance(m, PeftFrodLinear) for m in plain.modules())
        assert rel_err(plain(x), y_adapted if how == "merge_and_unload" else plain(x)) <= 1e-5
        assert rel_err(plain.layers[0].q_proj(x), y_base if how == "unload" else plain.layers[0].q_proj(x)) <= 1e-6


def test_cached_copies_follow_in_place_writes_and_model_to():
    # float64 inputs into a float32 layer: the V/U copies in x's dtype come from the cache
    model = tiny_peft()
    model.eval()
    layer = model.base_model.model.layers[1].v_proj
    x = _x(torch.float64)
    assert_same(model, x, tol=1e-10, call=layer)
    frod = model.base_model
    with torch.no_grad():
        frod.frod_V["v_proj"]["default"].mul_(1.5)
        for store in frod.frod_s_indices.values():
            idx = store["default"]
            idx.copy_(idx[:, torch.randperm(idx.shape[1])].flip(0))  # transposed pattern: still off-diagonal
    assert_same(model, x, tol=1e-10, call=layer)
    model.double()
    assert_same(model, x, tol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runtime offload moves weights to the CPU)")
def test_runtime_offload_base_weight_cuda():
    model = tiny_peft(runtime_offload_base_weight=True, frod_dropout=0.25).cuda()
    layer = model.base_model.model.layers[0].q_proj
    model.eval()
    assert_same(model, _x().cuda())
    assert layer.base_layer.weight.device.type == "cpu"  # offloaded: the fused path does not need it
    model.train()
    assert_same(model, _x().cuda())  # dropout active: PEFT's terms need the base weight back on the GPU


def test_disable_restores_exactly_what_enable_replaced():
    # a stand-in for a PEFT release that defines __init__ on the class itself, and inherits inject_adapter
    from frod_kernels.peft.patch import Patches

    class Base:
        def inject_adapter(self):
            return "base inject"

    class Model(Base):
        def __init__(self):
            self.built = "own init"

        def forward(self):
            return "own forward"

    own_init, own_forward = vars(Model)["__init__"], vars(Model)["forward"]
    patches = Patches([(Model, "__init__", lambda self: None), (Model, "inject_adapter", lambda self: "patched"),
                       (Model, "forward", lambda self: "patched")])
    for _ in range(2):  # installing twice must not record the replacements as the originals
        patches.install()
    assert Model().inject_adapter() == "patched" and not hasattr(Model(), "built")
    patches.uninstall()
    assert vars(Model)["__init__"] is own_init and vars(Model)["forward"] is own_forward
    assert "inject_adapter" not in vars(Model) and Model().inject_adapter() == "base inject"
    assert Model().built == "own init"


def test_disable_leaves_peft_classes_as_they_were():
    from frod_kernels.peft.state import FrodLayer, FrodModel, Linear, PeftModel

    classes = (Linear, FrodModel, FrodLayer, PeftModel)
    before = [dict(vars(c)) for c in classes]
    fkp.enable()
    fkp.disable()
    assert [dict(vars(c)) for c in classes] == before
