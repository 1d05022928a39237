"""Observers under torch.distributed: two processes (gloo on 127.0.0.1) observe different
shards of the same batches and must end with identical state and qparams, equal to those
of one process that observed the whole batches."""

import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qat
from qat import FakeQuantize, QuantSpec

from helpers import free_port

WORLD_SIZE = 2
TIMEOUT_S = 60


def build_modules():
    """Every observer per tensor and per channel, and FakeQuantize modules (whose fused
    path the single process takes, and the distributed ranks do not)."""
    modules = {}
    for name in ("minmax", "moving_average", "percentile", "mse", "entropy"):
        modules[f"{name}/tensor"] = qat.observers.build(
            QuantSpec(observer=name, averaging_constant=0.25, bins=256))
        modules[f"{name}/channel"] = qat.observers.build(
            QuantSpec(observer=name, symmetric=True, per_channel=True, axis=1, bins=256))
    modules["fq/moving_average"] = FakeQuantize(QuantSpec(averaging_constant=0.25))
    modules["fq/minmax/channel"] = FakeQuantize(QuantSpec(observer="minmax", per_channel=True,
                                                          axis=1))
    modules["fq/entropy"] = FakeQuantize(QuantSpec(observer="entropy", bits=4, bins=256))
    return modules


def global_batches():
    gen = torch.Generator().manual_seed(0)
    batches = []
    for step in range(5):
        x = torch.randn(12, 4, 3, generator=gen) * (1 + step) + 0.5 * step
        batches.append(x)
    batches[1][3, 2, 1] = math.nan
    batches[1][9, 0, 0] = math.inf
    return batches


def shard(x, rank, step):
    """Unequal shards of the batch dimension; at step 2 rank 1 gets an empty one."""
    cut = x.shape[0] if step == 2 else 3 + 2 * step
    return x[:cut] if rank == 0 else x[cut:]


def observe_all(rank=None):
    """Runs every module over the batches (this rank's shards, or all of each batch) and
    returns each module's state and qparams."""
    modules = build_modules()
    for step, x in enumerate(global_batches()):
        data = x if rank is None else shard(x, rank, step)
        for module in modules.values():
            module(data)
    results = {}
    for name, module in modules.items():
        tensors = {k: v.clone() for k, v in module.state_dict().items()
                   if isinstance(v, torch.Tensor)}
        scale, zero_point = module.calculate_qparams()
        tensors.update(qparams_scale=scale, qparams_zero_point=zero_point)
        results[name] = tensors
    return results


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        results = observe_all(rank)
        assert not build_modules()["fq/moving_average"]._uses_fused_op()
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_with_one_process_over_all_data(tmp_path):
    _run_ranks(_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    assert not (dist.is_available() and dist.is_initialized())
    single = observe_all()
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    for name in single:
        for key, expected in single[name].items():
            for rank, result in enumerate(ranks):
                got = result[name][key]
                assert got.dtype == expected.dtype, (name, key)
                assert torch.equal(got, expected), (name, key, rank, got, expected)
    # The shards did differ: the observers really had something to reduce.
    assert single["minmax/tensor"]["nonfinite_count"].item() == 2
    assert single["percentile/channel"]["histogram"].sum() == 12 * 4 * 3 * 5 - 2


def _small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 4))


def _training_data():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 4, (8,), generator=gen))
            for _ in range(3)]


def train_prepared(rank=None):
    """A prepared model calibrated on the first batch, then trained on the rest, wrapped
    in DDP on each rank (which gets half of every batch), or alone on whole batches.
    Returns its state."""
    model = qat.prepare(_small_cnn())
    batches = _training_data()
    if rank is not None:
        batches = [(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]) for x, y in batches]
    qat.calibrate(model, batches[:1], progress=False)
    trained = model
    if rank is not None:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    for x, y in batches[1:]:
        loss = torch.nn.functional.cross_entropy(trained(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _ddp_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        torch.save(train_prepared(rank), f"{out_dir}/ddp{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_ranks(worker, out_dir):
    context = mp.start_processes(worker, args=(free_port(), out_dir), nprocs=WORLD_SIZE,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish within {TIMEOUT_S} s")


def test_ddp_trains_a_prepared_model_as_one_process_on_whole_batches(tmp_path):
    _run_ranks(_ddp_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"ddp{rank}.pt") for rank in range(WORLD_SIZE)]
    single = train_prepared()
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    for key, expected in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        # Gradients averaged over the ranks and observer statistics reduced across them:
        # the same training as one process on whole batches, up to summation order.
        torch.testing.assert_close(ranks[0][key], expected, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{key}: {m}")
    assert not torch.equal(single["0.weight"], _small_cnn()[0].weight), "it trained"
