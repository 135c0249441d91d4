"""Argument handling shared by every public function: collecting weights from
a module or a list, checking them, and naming the offending tensor on error."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

SCOPES = {"global": 0, "layer": 1, "neuron": 2}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


def default_parameter_filter(name: str, parameter: torch.Tensor) -> bool:
    """The paper's choice: parameters named `*weight` with more than one dimension."""
    return name.endswith("weight") and parameter.dim() > 1


def parameters_to_prune(
    module: nn.Module, parameter_filter: Callable[[str, torch.Tensor], bool] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs of `module` selected by `parameter_filter`."""
    keep = parameter_filter or default_parameter_filter
    return [(name, param) for name, param in module.named_parameters() if keep(name, param)]


@dataclass
class Weights:
    """Validated weight tensors (detached) with names for error messages."""

    tensors: list[torch.Tensor]
    # one name per tensor, or None: tensor i is then named f"{argument}[{i}]"
    names: list[str] | None
    # the DTensor each local tensor came from (None for plain tensors); empty if none
    dtensors: list = field(default_factory=list)
    argument: str = "tensors"
    _dtypes: set | None = field(default=None, repr=False)

    def label(self, i: int) -> str:
        return self.names[i] if self.names is not None else f"{self.argument}[{i}]"

    @property
    def dtypes(self) -> set[torch.dtype]:
        """The distinct dtypes, found once per call (1 ms for 20,000 tensors).
        (Not functools.cached_property: its lock stops torch.compile.)"""
        if self._dtypes is None:
            self._dtypes = {t.dtype for t in self.tensors}
        return self._dtypes


def _dtensor_type():
    """DTensor's class if torch.distributed.tensor was imported, else None (a
    DTensor cannot exist before that import; this never triggers it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_dtensor(t) -> bool:
    """True for a torch.distributed DTensor (never imports torch.distributed.tensor)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def uses_distribution(group, tensors) -> bool:
    """True when a call must go through sap_kernels.distributed: a group is given,
    or the tensors (or the module's selected parameters) include DTensors."""
    if group is not None:
        return True
    dtensor = _dtensor_type()
    if dtensor is None:
        return False
    if isinstance(tensors, nn.Module):
        return any(isinstance(p, dtensor) for _, p in parameters_to_prune(tensors))
    if isinstance(tensors, Sequence):
        return _any_dtensor(tensors, dtensor)
    return False


def _any_dtensor(tensors, dtensor) -> bool:
    if tensor_facts(tensors) is not None:
        return False  # only plain tensors and Parameters
    # the distinct types first: 0.4 vs 1.7 ms of isinstance calls for 20,000 tensors
    return any(issubclass(kind, dtensor) for kind in set(map(type, tensors)))


@functools.cache
def _summarize_tensors():
    from ._extension import has_extension

    if not has_extension():
        return None
    from . import _C

    return _C.summarize_tensors


# Types whose C++ facts are their Python ones. A subclass (FakeTensor, DTensor,
# ...) may answer `.device` or `.dtype` in Python differently.
_PLAIN_TENSOR_TYPES = {torch.Tensor, nn.Parameter}


def tensor_facts(items, none_ok: bool = False):
    """(index of the first item that is not a tensor (nor None, with none_ok)
    or -1, the distinct types, whether any requires grad, the distinct devices,
    the distinct dtypes, whether all are contiguous) in one C++ pass
    (csrc/tensor_list_summary.cpp): 0.1 ms for 20,000 tensors against ~5 ms of
    attribute reads in Python. None while torch.compile traces (it cannot
    trace into C++), without the extension, or when an item is of another
    type than a plain tensor, a Parameter (or None): the caller then reads
    the tensors in Python."""
    summarize = _summarize_tensors()
    if summarize is None or torch.compiler.is_compiling():
        return None
    facts = summarize(items, none_ok)
    plain = _PLAIN_TENSOR_TYPES | ({type(None)} if none_ok else set())
    if facts[0] >= 0 or not set(facts[1]) <= plain:
        return None
    return facts


def all_contiguous(tensors) -> bool:
    """Whether every tensor is contiguous."""
    facts = tensor_facts(tensors)
    return facts[5] if facts is not None else all(t.is_contiguous() for t in tensors)


def _local_parts(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
    """(local shards, originating DTensors or [] if none): DTensors become `.to_local()`."""
    dtensor = _dtensor_type()
    if dtensor is None or not _any_dtensor(tensors, dtensor):
        return tensors, []
    originals = [t if isinstance(t, dtensor) else None for t in tensors]
    return [t.to_local() if o is not None else t for t, o in zip(tensors, originals)], originals


def collect_weights(tensors, argument: str = "tensors") -> Weights:
    if isinstance(tensors, nn.Module):
        pairs = parameters_to_prune(tensors)
        if not pairs:
            raise ValueError(
                f"{argument}: the module has no parameter named '*weight' with more than "
                "one dimension; pass a list of tensors instead"
            )
        names = [f"{argument}[{i}] ({name})" for i, (name, _) in enumerate(pairs)]
        local, originals = _local_parts([p.detach() for _, p in pairs])
        return Weights(local, names, originals, argument)
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{argument} must be a list of tensors or an nn.Module, not a tensor")
    if not isinstance(tensors, Sequence):
        raise TypeError(
            f"{argument} must be a list of tensors or an nn.Module, got {type(tensors).__name__}"
        )
    if len(tensors) == 0:
        raise ValueError(f"{argument} is an empty list")
    facts = tensor_facts(tensors)
    if facts is not None:
        # plain tensors and Parameters: every per-tensor fact from one C++ pass
        _, _, requires_grad, devices, dtypes, _ = facts
        out = list(tensors)
        if requires_grad:
            out = [t.detach() if t.requires_grad else t for t in out]
        weights = Weights(out, None, [], argument, _dtypes=set(dtypes))
        check_weights(weights, devices)
        return weights
    # Per-tensor work is kept to a few attribute reads: 20,000 tensors of 1,000
    # weights should not cost more in Python than the kernel spends on them.
    if not all(issubclass(kind, torch.Tensor) for kind in set(map(type, tensors))):
        _raise_not_a_tensor(tensors, argument)
    out = [t.detach() if t.requires_grad else t for t in tensors]
    local, originals = _local_parts(out)
    weights = Weights(local, None, originals, argument)
    check_weights(weights)
    return weights


def _raise_not_a_tensor(tensors, argument: str):
    index = next(i for i, t in enumerate(tensors) if not isinstance(t, torch.Tensor))
    raise TypeError(f"{argument}[{index}] is a {type(tensors[index]).__name__}, not a torch.Tensor")


def check_weights(weights: Weights, devices=None) -> None:
    """Raises, naming the tensor, unless every weight is floating and on one
    device. `devices`: their distinct devices, if the caller has them."""
    tensors = weights.tensors
    device = tensors[0].device
    # two cheap passes for the usual case (a set of (dtype, device) pairs costs
    # more: 6.1 vs 4.0 ms for 20,000 tensors)
    if devices is None:
        devices = {t.device for t in tensors}
    if len(devices) == 1 and all(dtype.is_floating_point for dtype in weights.dtypes):
        return
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise TypeError(
                f"{weights.label(i)} has dtype {t.dtype}; expected a floating dtype "
                "(float32, bfloat16 or float16)"
            )
        if t.device != device:
            raise ValueError(
                f"{weights.label(i)} is on {t.device} but {weights.label(0)} is on {device}; "
                "all tensors must be on one device"
            )


_PLAIN_MASK_TYPES = {torch.Tensor, type(None)}
# What an op (or the API's counting before it) raises on a mask that
# collect_masks passed unchecked: a wrong dtype, shape or device.
MASK_ERRORS = (ValueError, TypeError, RuntimeError)


def collect_masks(
    masks, weights: Weights, argument: str = "masks", *, op_checks: bool = False
) -> list[torch.Tensor | None]:
    """One optional bool mask per weight, checked for shape, dtype and device.

    op_checks=True: the ops that will run (the compiled CPU and CUDA ops, the
    Triton ops) check every mask's dtype, shape and device before any work or
    write, so plain tensors on the weights' device pass without the per-mask
    checks (15 ms for 20,000 masks); the caller runs `explain_bad_masks` when
    an op raises."""
    n = len(weights.tensors)
    if masks is None:
        return [None] * n
    if isinstance(masks, torch.Tensor) or not isinstance(masks, Sequence):
        raise TypeError(f"{argument} must be a list of bool tensors (or None)")
    if len(masks) != n:
        raise ValueError(f"{argument} has {len(masks)} entries but there are {n} weight tensors")
    if op_checks and not torch.compiler.is_compiling():
        # the devices still: a mask elsewhere (meta, another device type) would
        # send the op call to that device's kernel
        device = weights.tensors[0].device
        facts = tensor_facts(masks, none_ok=True)
        if facts is not None:
            devices = set(facts[3])
        elif set(map(type, masks)) <= _PLAIN_MASK_TYPES:
            devices = {m.device for m in masks if m is not None}
        else:
            devices = None
        if devices is not None and devices <= {device}:
            return list(masks)
    out: list[torch.Tensor | None] = []
    for i, (m, w) in enumerate(zip(masks, weights.tensors)):
        if m is None:
            out.append(None)
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{argument}[{i}] is a {type(m).__name__}, not a torch.Tensor")
        if is_dtensor(m):
            m = m.to_local()
        if m.dtype != torch.bool:
            raise TypeError(f"{argument}[{i}] has dtype {m.dtype}; expected torch.bool")
        if m.shape != w.shape:
            raise ValueError(
                f"{argument}[{i}] has shape {tuple(m.shape)} but {weights.label(i)} has shape "
                f"{tuple(w.shape)}"
            )
        if m.device != w.device:
            raise ValueError(
                f"{argument}[{i}] is on {m.device} but {weights.label(i)} is on {w.device}"
            )
        out.append(m)
    return out


def explain_bad_masks(masks, weights: Weights, argument: str = "masks") -> None:
    """After an op raised on masks that `collect_masks(..., op_checks=True)`
    passed unchecked: raises collect_masks's message (naming the weight) for a
    bad mask; returns if every mask is fine (the caller re-raises the op's error)."""
    if masks is not None and not torch.compiler.is_compiling():
        collect_masks(masks, weights, argument)


def check_exponents(p: float, q: float) -> tuple[float, float]:
    for name, value in (("p", p), ("q", q)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if p <= 0:
        raise ValueError(f"p must be > 0, got p={p}")
    if q <= p:
        raise ValueError(f"q must be greater than p, got p={p}, q={q}")
    return float(p), float(q)


def scope_code(scope: str) -> int:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {sorted(SCOPES)}, got {scope!r}")
    return SCOPES[scope]


def num_rows(t: torch.Tensor) -> int:
    """Rows of a weight in neuron scope: size(0), or 1 for a 0-d tensor."""
    return 1 if t.dim() == 0 else t.shape[0]


def unit_counts(weights: Weights, scope: str) -> list[int]:
    """Units per tensor: 0 (global), 1 (layer) or size(0) (neuron)."""
    if scope == "global":
        return [0] * len(weights.tensors)
    if scope == "layer":
        return [1] * len(weights.tensors)
    return [num_rows(t) for t in weights.tensors]


def num_units(weights: Weights, scope: str) -> int:
    return 1 if scope == "global" else sum(unit_counts(weights, scope))


def split_neuron(flat: torch.Tensor, weights: Weights) -> list[torch.Tensor]:
    """Splits a per-row result into one tensor per weight tensor."""
    return list(torch.split(flat, unit_counts(weights, "neuron")))
