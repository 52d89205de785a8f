"""Data parallel FRoD over 2 CPU processes (gloo): DDP and FSDP2 train to the parameters of one process.

One spawn of 2 workers (module fixture) runs every mode on the same fresh seed; the parent trains the same model on
the whole global batch in one process and the tests compare. Everything stays on 127.0.0.1.
"""

import inspect
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import frod_kernels as fk
from frod_kernels.reference import TOLERANCE, rel_err

WORLD, BATCH, STEPS, DIM = 2, 16, 3, 32
MODES = ("ddp", "ddp_sync_buffers", "fsdp2")
SPAWN_TIMEOUT_S = 120


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + F.gelu(self.fc(x))


class Net(nn.Module):
    """Two blocks whose FRoD layers share one basis (one category, as all q_proj of a model do) and a head."""

    def __init__(self, d=DIM, n_out=24):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(seed):
    torch.manual_seed(seed)
    net = Net().requires_grad_(False)
    first = fk.FrodLinear.from_linear(net.blocks[0].fc, sparse_rate=0.1, seed=seed)
    net.blocks[0].fc = first
    net.blocks[1].fc = fk.FrodLinear.from_linear(net.blocks[1].fc, V=first.basis)  # shares V and s_indices
    net.head = fk.FrodLinear.from_linear(net.head, sparse_rate=0.1, seed=seed + 1)
    return net


def global_batch(seed):
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randn(BATCH, 5, DIM, generator=g), torch.randn(BATCH, 5, 24, generator=g)


def train(model, params, x, y):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    for _ in range(STEPS):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _run_mode(mode, seed, x, y):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build(seed)
    info = {}
    if mode.startswith("ddp"):
        # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (both still sync once at construction)
        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"
        ddp = DDP(model, **{sync: mode == "ddp_sync_buffers"})
        names = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}
        broadcast = []
        inner = ddp._distributed_broadcast_coalesced

        def record(tensors, *args, **kwargs):  # DDP's per-forward buffer broadcast goes through here
            broadcast.append(sorted(names[id(t)] for t in tensors))
            return inner(tensors, *args, **kwargs)

        ddp._distributed_broadcast_coalesced = record
        log = ddp._get_ddp_logging_data()
        info.update(broadcast=broadcast, bucket_tensors=log["num_parameter_tensors"],
                    bucket_bytes=log["total_parameter_size_bytes"])
        train(ddp, list(trainable(model).values()), x, y)
        params = {n: p.detach().clone() for n, p in trainable(model).items()}
    else:
        # V is shared by layers in different blocks: FSDP2 groups may not share a parameter, so V stays
        # replicated (it is frozen); everything else, U included, is sharded per block.
        bases = {id(m.V): m.V for m in model.modules() if isinstance(m, fk.FrodBasis)}
        ignored = set(bases.values())
        for block in model.blocks:
            fully_shard(block, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        info["sharded"] = sorted(n for n, p in model.named_parameters() if type(p).__name__ == "DTensor")
        train(model, list(trainable(model).values()), x, y)
        params = {n: p.detach().full_tensor() for n, p in trainable(model).items()}
    return params, info


def _worker(rank, port, seed, out_dir):
    import warnings

    # FSDP2 warns that a module returned a view: the (tokens, out) -> (..., out) reshape of frod_linear
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, y = global_batch(seed)
        local = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        out = {mode: _run_mode(mode, seed, x[local], y[local]) for mode in MODES}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    seed = int(torch.randint(0, 2**20, ()))
    out_dir = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.start_processes(_worker, args=(_free_port(), seed, out_dir), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {SPAWN_TIMEOUT_S} s")
    per_rank = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    x, y = global_batch(seed)
    single = build(seed)
    train(single, list(trainable(single).values()), x, y)
    return seed, per_rank, {n: p.detach() for n, p in trainable(single).items()}


@pytest.mark.parametrize("mode", MODES)
def test_data_parallel_equals_one_process(runs, mode):
    seed, per_rank, single = runs
    for rank, out in enumerate(per_rank):
        params, _ = out[mode]
        assert params.keys() == single.keys()
        for name, p in params.items():
            err = rel_err(p, single[name])
            assert err <= TOLERANCE[torch.float32], f"{mode} rank {rank} {name}: {err:.2e} (seed {seed})"
    # training moved every parameter by far more than the tolerance (the comparison is not of initial values)
    start = trainable(build(seed))
    assert all(rel_err(single[n], start[n]) > 10 * TOLERANCE[torch.float32] for n in single)


def test_ddp_reduces_only_trainable_parameters(runs):
    _, per_rank, single = runs
    _, info = per_rank[0]["ddp"]
    # lambda_l and s_values of 3 layers: no V, U or bias in DDP's gradient buckets
    assert info["bucket_tensors"] == len(single) == 6
    assert info["bucket_bytes"] == sum(p.numel() * p.element_size() for p in single.values())


def test_shared_basis_is_not_broadcast_per_step(runs):
    _, per_rank, _ = runs
    # forward_sync_buffers=False (broadcast_buffers=False before torch 2.13), the advice for FRoD models: nothing
    # is broadcast after DDP's one-time sync at construction
    assert per_rank[0]["ddp"][1]["broadcast"] == []
    # the default: each forward broadcasts the constant int64 pattern buffers, once per shared basis, never V
    per_step = per_rank[0]["ddp_sync_buffers"][1]["broadcast"]
    assert len(per_step) == STEPS
    expected = ["blocks.0.fc.basis.layout", "blocks.0.fc.basis.s_indices", "head.basis.layout",
                "head.basis.s_indices"]
    assert all(names == expected for names in per_step), per_step


def test_fsdp2_shards_all_but_the_shared_basis(runs):
    _, per_rank, _ = runs
    sharded = per_rank[0]["fsdp2"][1]["sharded"]
    assert not any(n.endswith(".V") for n in sharded)
    # U is stored as its contiguous transpose U_t (docs/DESIGN.md section 6, "Layouts")
    assert {"blocks.0.fc.U_t", "blocks.1.fc.U_t", "head.U_t", "blocks.0.fc.s_values", "head.lambda_l"} <= set(sharded)
