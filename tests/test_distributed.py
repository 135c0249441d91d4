"""Distributed PQI, thresholds and pruning (gloo, CPU): every result must equal the
single-process result on the gathered tensors (PQI within 1e-12, thresholds and
masks bit-identical), and bad input on one rank must raise on every rank.

Process start-up is slow on a small CPU machine, so each spawned job runs many
checks; a job that does not finish within its timeout fails the test."""

from __future__ import annotations

import copy
import math
import os
import socket
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sap_kernels
from sap_kernels.distributed import RemoteRankError, last_exchange


def _has_cpu_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"sap_kernels::{op}", "CPU")
    except RuntimeError:
        return False


# the compiled CPU ops when they are all there, else the float64 reference ops
BACKEND = "cpu" if _has_cpu_kernel("prune_masks") else "reference"
HISTOGRAM_BYTES = 65536 * 8
STATUS_BYTES = 10 * 8
JOB_TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


# --- spawning -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, scenarios: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    for name in scenarios:
        SCENARIOS[name](rank, world)
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()
    # Skip interpreter finalization: once, under load, a rank that had passed every
    # check died at exit with SIGABRT ("terminate called without an active exception"),
    # the Gloo-threads-at-finalization crash of pytorch/pytorch#179291.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_job(world: int, scenarios: tuple[str, ...], timeout: float = JOB_TIMEOUT_S) -> None:
    """Runs the scenarios on `world` gloo processes; fails on any error or on timeout."""
    context = mp.start_processes(
        _entry,
        args=(world, _free_port(), scenarios),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"distributed job {scenarios} on {world} ranks timed out after {timeout}s")


# --- data -----------------------------------------------------------------------

SHAPES = [(9, 5), (4, 3), (13,), (1, 7), (6, 2, 3)]


def _full_tensors(kind: str, seed: int) -> list[torch.Tensor]:
    """The same tensors on every rank: 'bf16_ties' and 'f32_ties' draw from a small
    set of values (ties span ranks), 'f32' is normal."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        if kind == "f32":
            out.append(torch.randn(shape, generator=generator))
        else:
            values = torch.randint(-6, 7, shape, generator=generator).float() * 0.375
            out.append(values.to(torch.bfloat16 if kind == "bf16_ties" else torch.float32))
    return out


def _full_masks(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    return [torch.rand(shape, generator=generator) >= 0.3 for shape in SHAPES]


def _row_chunks(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    return list(torch.tensor_split(t, world, dim=0))


def _dtensor_chunks(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """How DTensor's Shard(0) splits rows: torch.chunk, then empty shards."""
    chunks = list(torch.chunk(t, world, dim=0))
    empty = t[:0]
    return chunks + [empty] * (world - len(chunks))


def _row_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert torch.equal(actual, expected), (what, actual, expected)


def _assert_masks_equal(actual, expected, what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), (what, i, a, e)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, equal_nan=True, msg=what)


def _check_pqi(local, local_masks, full, full_masks, scope: str, group, **kw) -> list:
    """Distributed PQI vs the single process on the gathered tensors: within 1e-12
    with the float64 reference ops; with BACKEND within its accuracy bound (1e-6;
    the kernels' float32 partial sums depend on how the tensors are split).
    Returns the distributed pq_sums from BACKEND."""
    for backend, atol in (("reference", 1e-12), (BACKEND, 1e-6)):
        got = sap_kernels.pqi(local, local_masks, scope=scope, group=group, backend=backend, **kw)
        expected = sap_kernels.pqi(full, full_masks, scope=scope, backend="reference", **kw)
        if scope == "neuron":
            for g, e in zip(got, expected):
                _close(g, e, f"pqi neuron {backend}", atol)
        else:
            _close(got, expected, f"pqi {scope} {backend}", atol)
    return sap_kernels.pq_sums(local, local_masks, scope=scope, group=group, backend=BACKEND)


# --- scenarios ---------------------------------------------------------------------


def _scenario_plain(rank: int, world: int) -> None:
    """Plain local shards with group=WORLD: rows of every tensor split over ranks."""
    group = dist.group.WORLD
    kinds = ("bf16_ties", "f32_ties", "f32") if world == 2 else ("bf16_ties", "f32_ties")
    for seed, kind in enumerate(kinds):
        full, full_masks = _full_tensors(kind, seed), _full_masks(seed)
        chunks = [_row_chunks(t, world) for t in full]
        mask_chunks = [_row_chunks(m, world) for m in full_masks]
        local = [c[rank] for c in chunks]
        local_masks = [c[rank] for c in mask_chunks]
        # rank order, then flat order within a rank: the gathered order of ties
        gathered = [c[r] for r in range(world) for c in chunks]
        gathered_masks = [c[r] for r in range(world) for c in mask_chunks]
        kw = {"backend": BACKEND}

        for scope in ("global", "layer"):
            for masks_local, masks_full in ((None, None), (local_masks, full_masks)):
                sums = _check_pqi(local, masks_local, full, masks_full, scope, group)
                # with any backend the all-reduced sums are the per-rank sums added up
                per_rank = [
                    sap_kernels.pq_sums(
                        [c[r] for c in chunks],
                        None if masks_local is None else [c[r] for c in mask_chunks],
                        scope=scope,
                        **kw,
                    )
                    for r in range(world)
                ]
                for field in range(3):
                    expected = sum(s[field] for s in per_rank)
                    torch.testing.assert_close(sums[field], expected, rtol=1e-14, atol=0)
        assert last_exchange().payload_bytes == STATUS_BYTES + 24 * len(full)
        rows_full = [_row_chunks(m, world)[rank] for m in full]
        rows_masks = [_row_chunks(m, world)[rank] for m in full_masks]
        _check_pqi(local, local_masks, rows_full, rows_masks, "neuron", group)

        retained = sum(int(m.sum()) for m in full_masks)
        for k in (1, retained // 3, retained // 2 + 1, retained):
            got = sap_kernels.magnitude_threshold(local, k, local_masks, group=group, **kw)
            expected = sap_kernels.magnitude_threshold(full, k, full_masks, **kw)
            _assert_bits_equal(got, expected, f"threshold k={k}")
        passes = 1 if kind == "bf16_ties" else 2
        assert last_exchange().payload_bytes == STATUS_BYTES + passes * HISTOGRAM_BYTES
        per_tensor = torch.tensor([max(1, int(m.sum()) // 2) for m in full_masks])
        got = sap_kernels.magnitude_threshold(
            local, per_tensor, local_masks, scope="layer", group=group, **kw
        )
        expected = sap_kernels.magnitude_threshold(
            full, per_tensor, full_masks, scope="layer", **kw
        )
        _assert_bits_equal(got, expected, "threshold layer")

        for count in (0, 1, retained // 3, retained // 2, retained - 1, retained):
            got = sap_kernels.prune(local, local_masks, count, group=group, **kw)
            expected = sap_kernels.prune(gathered, gathered_masks, count, **kw)
            n = len(full)
            _assert_masks_equal(got, expected[rank * n : (rank + 1) * n], f"prune {count}")
        counts = torch.tensor([int(m.sum()) * (i + 1) // 7 for i, m in enumerate(full_masks)])
        got = sap_kernels.prune(local, local_masks, counts, scope="layer", group=group, **kw)
        expected = sap_kernels.prune(full, full_masks, counts, scope="layer", **kw)
        _assert_masks_equal(got, [_row_chunks(e, world)[rank] for e in expected], "prune layer")
        local_rows = [_row_view(m).sum(1).clamp(max=2) for m in local_masks]
        got = sap_kernels.prune(local, local_masks, local_rows, scope="neuron", group=group, **kw)
        full_rows = [_row_view(m).sum(1).clamp(max=2) for m in full_masks]
        expected = sap_kernels.prune(full, full_masks, full_rows, scope="neuron", **kw)
        _assert_masks_equal(got, [_row_chunks(e, world)[rank] for e in expected], "neuron")


def _scenario_dtensor(rank: int, world: int) -> None:
    """DTensors: Shard(0) and Replicate on a 1-D mesh, (Replicate, Shard(0)) on a
    2-D mesh; the group comes from the mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    layouts = [("1d", init_device_mesh("cpu", (world,)))]
    if world == 4:
        layouts.append(("2d", init_device_mesh("cpu", (2, 2))))
    for seed, kind in enumerate(("bf16_ties", "f32_ties")):
        full, full_masks = _full_tensors(kind, 10 + seed), _full_masks(10 + seed)
        for layout, mesh in layouts:
            if layout == "1d":  # tensors 1 and 3 replicated, the others sharded by rows
                placements = [
                    [Replicate()] if i in (1, 3) else [Shard(0)] for i in range(len(full))
                ]
                shards = world
                position = rank
            else:
                placements = [[Replicate(), Shard(0)]] * len(full)
                shards = 2
                position = mesh.get_coordinate()[1]
            weights = [distribute_tensor(t, mesh, p) for t, p in zip(full, placements)]
            masks = [distribute_tensor(m, mesh, p) for m, p in zip(full_masks, placements)]
            sharded = [any(p.is_shard() for p in ps) for ps in placements]

            def part(t, i, r, sharded=sharded, shards=shards):
                return _dtensor_chunks(t, shards)[r] if sharded[i] else t

            for i, w in enumerate(weights):
                assert torch.equal(w.to_local(), part(full[i], i, position)), "shard layout"
            # contributions in rank order: each shard once, each replicated tensor once
            gathered, gathered_masks, owner = [], [], {}
            for r in range(shards):
                for i in range(len(full)):
                    if sharded[i] or r == 0:
                        owner[(r, i)] = len(gathered)
                        gathered.append(part(full[i], i, r))
                        gathered_masks.append(part(full_masks[i], i, r))
            kw = {"backend": BACKEND}
            for scope in ("global", "layer"):
                _check_pqi(weights, masks, full, full_masks, scope, None)
            retained = sum(int(m.sum()) for m in full_masks)
            for k in (1, retained // 2, retained):
                got = sap_kernels.magnitude_threshold(weights, k, masks, **kw)
                _assert_bits_equal(
                    got, sap_kernels.magnitude_threshold(full, k, full_masks, **kw), "k"
                )
            for count in (retained // 4, retained // 2 + 1, retained):
                got = sap_kernels.prune(weights, masks, count, **kw)
                expected = sap_kernels.prune(gathered, gathered_masks, count, **kw)
                for i, g in enumerate(got):
                    assert isinstance(g, DTensor) and g.placements == weights[i].placements
                    source = owner[(position, i)] if sharded[i] else owner[(0, i)]
                    assert torch.equal(g.to_local(), expected[source]), (layout, count, i)
            counts = torch.tensor([int(m.sum()) * (i + 2) // 9 for i, m in enumerate(full_masks)])
            got = sap_kernels.prune(weights, masks, counts, scope="layer", **kw)
            expected = sap_kernels.prune(full, full_masks, counts, scope="layer", **kw)
            for i, g in enumerate(got):
                assert torch.equal(g.to_local(), part(expected[i], i, position)), (layout, i)
            own_rows = [part(t, i, position) for i, t in enumerate(full)]
            own_masks = [part(m, i, position) for i, m in enumerate(full_masks)]
            _check_pqi(weights, masks, own_rows, own_masks, "neuron", None)


def _sap_iteration(model, masks, scope: str):
    """One SAP iteration through the public API: PQI, counts, prune, zero pruned.
    The PQI uses the float64 reference ops so that the counts (ceil/floor of the
    PQI) cannot differ by a kernel's rounding between split and whole tensors."""
    sums = sap_kernels.pq_sums(model, masks, scope=scope, backend="reference")
    pqi = sap_kernels.pqi(model, masks, scope=scope, backend="reference")
    _, counts = sap_kernels.sap_prune_counts(pqi, sums.count)
    new_masks = sap_kernels.prune(model, masks, counts, scope=scope, backend=BACKEND)
    parameters = [p for _, p in sap_kernels.parameters_to_prune(model)]
    sap_kernels.apply_masks_(parameters, new_masks, backend=BACKEND)
    return pqi, counts, new_masks


def _small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 11), torch.nn.ReLU(), torch.nn.Linear(11, 5), torch.nn.Linear(5, 3)
    )


def _fsdp_model_and_copy(seed: int, world: int):
    """_small_model(seed) sharded with FSDP2 (each Linear, then the whole) over
    all ranks, and an unsharded copy taken before sharding."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _small_model(seed)
    reference = copy.deepcopy(model)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, reference


def _scenario_fsdp(rank: int, world: int) -> None:
    """One SAP iteration (two, with masks) on an FSDP2 model equals the same on the
    unsharded model in one process; the sharded forward then matches too."""
    for scope in ("global", "layer"):
        model, reference = _fsdp_model_and_copy(3, world)
        masks, reference_masks = None, None
        for _ in range(2):
            pqi, counts, masks = _sap_iteration(model, masks, scope)
            ref_pqi, ref_counts, reference_masks = _sap_iteration(reference, reference_masks, scope)
            _close(pqi, ref_pqi, f"fsdp pqi {scope}")
            assert torch.equal(counts, ref_counts), (counts, ref_counts)
            assert int(counts.sum()) > 0
            for mask, expected in zip(masks, reference_masks):
                assert torch.equal(mask.to_local(), _dtensor_chunks(expected, world)[rank])
        inputs = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(model(inputs), reference(inputs))
        # prune_ updates DTensor masks in place (one more weight per unit)
        units = 1 if scope == "global" else len(masks)
        before = [m.to_local().clone() for m in masks]
        sap_kernels.prune_(
            model, masks, torch.ones(units, dtype=torch.long), scope=scope, backend=BACKEND
        )
        removed = sum(int(b.sum() - m.to_local().sum()) for b, m in zip(before, masks))
        everyone = torch.tensor([removed])
        dist.all_reduce(everyone)
        assert int(everyone) == units, (int(everyone), units)


def _scenario_pruner_fsdp(rank: int, world: int) -> None:
    """The Pruner on an FSDP2 model keeps the same records (PQI, counts, densities)
    and masks as on the unsharded model in one process, for every policy."""
    policies = [
        sap_kernels.SAPPolicy(scope="global"),
        sap_kernels.SAPPolicy(scope="layer"),
        sap_kernels.OneShotPolicy(rate=0.3, scope="layer"),
        sap_kernels.LotteryTicketPolicy(fraction=0.3),
    ]
    for policy in policies:
        model, reference = _fsdp_model_and_copy(6, world)
        # float64 reference sums: split and whole tensors give the same counts
        pruner = sap_kernels.Pruner(model, policy, backend="reference")
        expected = sap_kernels.Pruner(reference, policy, backend="reference")
        for _ in range(2):
            record, want = pruner.prune(), expected.prune()
            what = f"pruner {policy}"
            _close(record.pqi, want.pqi, what)
            for field in ("retained", "retained_bound", "pruned"):
                assert torch.equal(getattr(record, field), getattr(want, field)), (what, field)
            for field in ("global_pqi", "density_before", "density"):
                assert math.isclose(getattr(record, field), getattr(want, field), rel_tol=1e-12), (
                    what,
                    field,
                    getattr(record, field),
                    getattr(want, field),
                )
            assert pruner.retained_weights() == expected.retained_weights()
            assert pruner.total_weights() == expected.total_weights()
            for mask, whole in zip(pruner.masks, expected.masks):
                assert torch.equal(mask.to_local(), _dtensor_chunks(whole, world)[rank]), what
        inputs = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(model(inputs), reference(inputs))


def _scenario_ddp(rank: int, world: int) -> None:
    """Under DDP every rank holds the whole model: no group, identical masks everywhere."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_small_model(4))
    reference = _small_model(4)
    _, _, masks = _sap_iteration(model, None, "global")
    _, _, expected = _sap_iteration(reference, None, "global")
    _assert_masks_equal(masks, expected, "ddp")
    flat = torch.cat([m.flatten() for m in masks]).to(torch.uint8)
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    assert all(torch.equal(e, flat) for e in everyone)


def _expect_error(rank: int, bad_rank: int, error_type, call, match: str) -> None:
    expected = error_type if rank == bad_rank or bad_rank < 0 else RemoteRankError
    with pytest.raises(expected, match=match if expected is error_type else "rank"):
        call()


def _scenario_errors(rank: int, world: int) -> None:
    """Bad input on one rank raises on every rank; the group stays usable after."""
    group = dist.group.WORLD
    bad = world - 1
    full = _full_tensors("bf16_ties", 7)
    local = [_row_chunks(t, world)[rank] for t in full]
    wrong_masks = [torch.ones(3, 3, dtype=torch.bool)] + [None] * (len(local) - 1)
    masks = wrong_masks if rank == bad else None
    kw = {"backend": BACKEND, "group": group}
    _expect_error(rank, bad, ValueError, lambda: sap_kernels.pqi(local, masks, **kw), "shape")
    counts = 1.5 if rank == bad else 3
    _expect_error(
        rank, bad, TypeError, lambda: sap_kernels.prune(local, None, counts, **kw), "integers"
    )
    p = -1.0 if rank == bad else 0.5
    _expect_error(rank, bad, ValueError, lambda: sap_kernels.pq_sums(local, p=p, **kw), "p must")
    nan_local = [t.clone() for t in local]
    if rank == bad:
        nan_local[0].view(-1)[0] = float("nan")
    _expect_error(  # found after the histogram all-reduce: the same error everywhere
        rank,
        -1,
        ValueError,
        lambda: sap_kernels.magnitude_threshold(nan_local, 1, **kw),
        "NaN",
    )
    _expect_error(
        rank, bad, ValueError, lambda: sap_kernels.pqi(nan_local, **kw), "NaN|infinity|finite"
    )
    fewer = local[:-1] if rank == bad else local
    _expect_error(  # a disagreement between ranks is the same error everywhere
        rank,
        -1,
        ValueError,
        lambda: sap_kernels.prune(fewer, None, 2, scope="layer", **kw),
        "different",
    )
    total = sum(t.numel() for t in full)
    _expect_error(
        rank,
        -1,
        ValueError,
        lambda: sap_kernels.magnitude_threshold(local, total + 1, **kw),
        "out of range",
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    by_columns = [distribute_tensor(full[0].float(), init_device_mesh("cpu", (world,)), [Shard(1)])]
    _expect_error(  # rows split over ranks: refused on every rank
        rank,
        -1,
        NotImplementedError,
        lambda: sap_kernels.prune(by_columns, None, 1, scope="neuron", backend=BACKEND),
        "whole rows",
    )
    # and the group is still in step
    _close(sap_kernels.pqi(local, **kw), sap_kernels.pqi(full, backend=BACKEND), "after", 1e-6)


SCENARIOS = {
    "plain": _scenario_plain,
    "dtensor": _scenario_dtensor,
    "fsdp": _scenario_fsdp,
    "pruner_fsdp": _scenario_pruner_fsdp,
    "ddp": _scenario_ddp,
    "errors": _scenario_errors,
}


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_matches_single_process(world):
    run_job(world, ("plain", "dtensor", "fsdp", "pruner_fsdp", "ddp"))


def test_bad_input_raises_on_every_rank():
    run_job(2, ("errors",), timeout=90)
