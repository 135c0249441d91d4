"""The API's one-pass argument facts (csrc/tensor_list_summary.cpp) against
the same facts read in Python, and the API's behaviour through them."""

import random

import pytest
import torch
from torch import nn

import sap_kernels as sk
from sap_kernels import _inputs
from sap_kernels._extension import has_extension

pytestmark = pytest.mark.skipif(not has_extension(), reason="sap_kernels._C not built")


def python_facts(items, none_ok=False):
    """tensor_facts as Python reads it (None where the C++ pass is not used)."""
    tensors = []
    for item in items:
        if item is None and none_ok:
            continue
        if type(item) not in (torch.Tensor, nn.Parameter):
            return None
        tensors.append(item)
    types = {type(item) for item in items}
    return (
        -1,
        types,
        any(t.requires_grad for t in tensors),
        {t.device for t in tensors},
        {t.dtype for t in tensors},
        all(t.is_contiguous() for t in tensors),
    )


def random_item(rng: random.Random, none_ok: bool):
    shape = (rng.randint(1, 5), rng.randint(1, 4))
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16, torch.bool, torch.int64])
    device = rng.choice(["cpu", "cpu", "meta"])
    t = torch.zeros(shape, dtype=dtype, device=device)
    kind = rng.randrange(6)
    if kind == 0:
        return t.t()  # not contiguous (unless a dimension is 1)
    if kind == 1 and dtype.is_floating_point:
        return nn.Parameter(t, requires_grad=rng.random() < 0.5)
    if kind == 2 and dtype.is_floating_point:
        return t.requires_grad_()
    if kind == 3 and none_ok:
        return None
    return t


@pytest.mark.parametrize("none_ok", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_facts_match_python(seed, none_ok):
    rng = random.Random(seed)
    items = [random_item(rng, none_ok) for _ in range(rng.randint(1, 12))]
    got = _inputs.tensor_facts(items, none_ok)
    want = python_facts(items, none_ok)
    assert got is not None and want is not None
    first_bad, types, requires_grad, devices, dtypes, contiguous = got
    assert first_bad == -1
    assert set(types) == want[1]
    assert requires_grad == want[2]
    assert set(devices) == want[3] and len(devices) == len(want[3])
    assert set(dtypes) == want[4] and len(dtypes) == len(want[4])
    assert contiguous == want[5]
    assert _inputs.all_contiguous([t for t in items if t is not None]) == want[5]


class MyTensor(torch.Tensor):
    pass


@pytest.mark.parametrize(
    "bad", [3, "w", None, torch.zeros(2).as_subclass(MyTensor)], ids=["int", "str", "None", "sub"]
)
def test_other_items_are_left_to_python(bad):
    items = [torch.zeros(2), torch.zeros(3), bad, torch.zeros(1)]
    if bad is not None and not isinstance(bad, torch.Tensor):
        # the C++ pass stops at the first item that is not a tensor
        assert sk._C.summarize_tensors(items)[0] == 2
    assert _inputs.tensor_facts(items) is None
    assert _inputs.tensor_facts(items, none_ok=True) is None or bad is None


def test_none_counts_as_a_type_only_with_none_ok():
    items = [None, torch.zeros(2, dtype=torch.bool), None]
    first_bad, types, *_ = sk._C.summarize_tensors(items, True)
    assert first_bad == -1 and set(types) == {type(None), torch.Tensor}
    assert sk._C.summarize_tensors(items)[0] == 0


def test_api_errors_through_the_facts():
    w = [torch.randn(4, 3), torch.randn(5)]
    with pytest.raises(TypeError, match=r"tensors\[1\] is a int"):
        sk.pqi([w[0], 7])
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int64"):
        sk.pqi([w[0], torch.arange(5)])
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
        sk.pqi([w[0], torch.empty(5, device="meta")])
    with pytest.raises(ValueError, match=r"masks\[0\] is on meta"):
        sk.pqi(w, [torch.ones(4, 3, dtype=torch.bool, device="meta"), None])


def test_api_detaches_weights_that_require_grad():
    w = [nn.Parameter(torch.randn(6, 5)), torch.randn(7)]
    masks = [torch.ones(6, 5, dtype=torch.bool), torch.ones(7, dtype=torch.bool)]
    weights = _inputs.collect_weights(w)
    assert not any(t.requires_grad for t in weights.tensors)
    assert weights.dtypes == {torch.float32}
    sk.prune_(w, masks, 10)  # in place on the masks: no autograd error
    assert sum(int(m.sum()) for m in masks) == 37 - 10


def test_prune_in_place_on_non_contiguous_masks_copies_back():
    torch.manual_seed(0)
    w = [torch.randn(8, 6), torch.randn(5, 4)]
    masks = [torch.ones(6, 8, dtype=torch.bool).t(), torch.ones(5, 4, dtype=torch.bool)]
    want = sk.prune(w, [m.contiguous() for m in masks], 20, backend="reference")
    sk.prune_(w, masks, 20)
    for m, r in zip(masks, want):
        assert torch.equal(m, r)
