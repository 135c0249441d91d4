"""This rank's view of distributed inputs: DTensor layouts (FSDP2, distribute_tensor),
the process group they imply, and which rank's copy of a replicated tensor counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._inputs import Weights, collect_masks, collect_weights, is_dtensor


def _mesh_group(mesh):
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh._flatten().get_group()


def _raw_list(tensors) -> list:
    if isinstance(tensors, torch.nn.Module):
        from ._inputs import parameters_to_prune

        return [p for _, p in parameters_to_prune(tensors)]
    if isinstance(tensors, (list, tuple)):
        return list(tensors)
    return []


def infer_group(group, tensors):
    """`group` if given, else the process group of the first DTensor's mesh, else None."""
    if group is not None:
        return group
    for t in _raw_list(tensors):
        if is_dtensor(t):
            return _mesh_group(t.device_mesh)
    return None


@dataclass
class LocalShards:
    """This rank's view of the inputs.

    weights/masks: every local shard (replicas included), pruned and returned.
    counted/counted_masks: what this rank contributes to sums and histograms
    (a replica that another rank contributes becomes an empty view).
    sources: for each tensor, the group rank whose copy decides its ties.
    """

    weights: Weights
    masks: list
    counted: Weights
    counted_masks: list
    sources: list[int]
    dtensors: list
    has_replicas: bool


def _placement_source(dtensor, group, label: str) -> tuple[int, bool]:
    """(group rank of the copy that counts, whether this tensor has replicas)."""
    mesh = dtensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"{label}: this rank is not in the DTensor's device mesh")
    source = list(coordinate)
    replicated = False
    for dim, placement in enumerate(dtensor.placements):
        if placement.is_partial():
            raise ValueError(
                f"{label} has a Partial placement (pending reduction); redistribute it to "
                "Shard or Replicate first"
            )
        if placement.is_replicate() and mesh.size(dim) > 1:
            replicated = True
            source[dim] = 0
    global_rank = int(mesh.mesh[tuple(source)])
    return dist.get_group_rank(group, global_rank), replicated


def local_shards(tensors, masks, group, scope: str, group_given: bool) -> LocalShards:
    weights = collect_weights(tensors)
    mask_list = collect_masks(masks, weights)
    dtensors = weights.dtensors or [None] * len(weights.tensors)
    rank = dist.get_rank(group)
    if any(d is not None for d in dtensors):
        if any(d is None for d in dtensors) and not group_given:
            raise ValueError(
                "tensors mix DTensors and plain tensors; pass group= to say how the plain "
                "tensors are shared"
            )
        meshes = {d.device_mesh for d in dtensors if d is not None}
        if len(meshes) > 1:
            raise ValueError("the DTensors live on different device meshes; pass one mesh's")
    sources, counted, counted_masks, has_replicas = [], [], [], False
    for i, (w, m, d) in enumerate(zip(weights.tensors, mask_list, dtensors)):
        source, replicated = (
            (rank, False) if d is None else _placement_source(d, group, weights.label(i))
        )
        if scope == "neuron" and d is not None:
            _require_whole_rows(d, weights.label(i))
        has_replicas |= replicated
        sources.append(source)
        if source == rank:
            counted.append(w)
            counted_masks.append(m)
        else:
            counted.append(w.reshape(-1)[:0])
            counted_masks.append(None if m is None else m.reshape(-1)[:0])
    counted_weights = Weights(counted, weights.names, argument=weights.argument)
    return LocalShards(
        weights, mask_list, counted_weights, counted_masks, sources, dtensors, has_replicas
    )


def _require_whole_rows(dtensor, label: str) -> None:
    for placement in dtensor.placements:
        if placement.is_shard() and placement.dim % max(dtensor.dim(), 1) != 0:
            raise NotImplementedError(
                f"{label} is sharded along dim {placement.dim}: scope='neuron' needs whole "
                "rows on each rank (Shard(0) or Replicate)"
            )


def as_dtensors(masks, shards: LocalShards) -> list:
    """Wraps local masks as DTensors laid out like the DTensor weights they belong to."""
    from torch.distributed.tensor import DTensor

    out = []
    for mask, d in zip(masks, shards.dtensors):
        if d is None:
            out.append(mask)
        else:
            out.append(
                DTensor.from_local(
                    mask,
                    d.device_mesh,
                    d.placements,
                    run_check=False,
                    shape=d.shape,
                    stride=d.stride(),
                )
            )
    return out
