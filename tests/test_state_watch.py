"""fusedres._C.StateWatch (csrc/state_watch.h): the cheap stand-in for an inference plan's key.

It must report every change the key would see (and may report more: it is conservative), and
nothing when nothing changed; each kind of change is made on its own to an nn.Conv2d watched the
way FusedResNet watches its modules.
"""

import pytest
import torch
import torch.nn as nn

from fusedres import _ext

pytestmark = pytest.mark.skipif(getattr(_ext._C, "StateWatch", None) is None,
                                reason="fusedres._C is not built here")


class _SubConv(nn.Conv2d):
    pass


def _change(conv: nn.Conv2d, what: str) -> None:
    with torch.no_grad():
        if what == "attribute_rebound":
            conv.padding = (2, 2)
        elif what == "attribute_added":
            conv.note = "kept"
        elif what == "equal_value_rebound":
            conv.padding_mode = "".join(["ze", "ros"])  # equal, another object: counted
        elif what == "parameter_replaced":
            conv.weight = nn.Parameter(conv.weight.detach().clone())
        elif what == "bias_removed":
            conv.bias = None
        elif what == "weight_in_place":
            conv.weight.add_(1.0)
        elif what == "data_swapped":
            conv.weight.data = torch.zeros_like(conv.weight)
        elif what == "data_swapped_same_memory":
            # A new storage over the old one's memory, as an allocator may hand freed memory out
            # again: only the storage's identity tells the two apart.
            same_memory = torch.from_numpy(conv.weight.detach().numpy())
            assert same_memory.data_ptr() == conv.weight.data_ptr()
            conv.weight.data = same_memory
        elif what == "dtype":
            conv.double()
        elif what == "layout":
            conv.to(memory_format=torch.channels_last)
        elif what == "forward_hook":
            conv.register_forward_hook(lambda *args: None)
        elif what == "forward_pre_hook":
            conv.register_forward_pre_hook(lambda *args: None)
        elif what == "dict_replaced":
            conv.__dict__ = dict(conv.__dict__)
        elif what == "class_changed":
            conv.__class__ = _SubConv
        elif what == "train":
            conv.train()
        else:
            raise ValueError(what)


CHANGES = ["attribute_rebound", "attribute_added", "equal_value_rebound", "parameter_replaced",
           "bias_removed", "weight_in_place", "data_swapped", "data_swapped_same_memory", "dtype",
           "layout", "forward_hook",
           "forward_pre_hook", "dict_replaced", "class_changed", "train"]


def _watch(conv: nn.Conv2d):
    tensors = [t for t in conv._parameters.values() if t is not None]
    return _ext._C.StateWatch([(conv, conv.__dict__)],
                              [conv._parameters, conv._buffers, conv._modules,
                               conv._forward_hooks, conv._forward_pre_hooks], tensors)


def test_nothing_changed():
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    watch = _watch(conv)
    with torch.no_grad():
        conv(torch.randn(1, 4, 5, 5))  # a call changes nothing
    conv.eval()  # the same training flag, rebound to the same object
    assert watch.unchanged()
    assert watch.unchanged()


@pytest.mark.parametrize("what", CHANGES)
def test_each_change_is_seen(what):
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    watch = _watch(conv)
    _change(conv, what)
    assert not watch.unchanged()


def test_inference_tensors_are_refused():
    with torch.inference_mode():
        t = torch.ones(3)
    with pytest.raises(RuntimeError, match="inference tensor"):
        _ext._C.StateWatch([], [], [t])


@pytest.mark.parametrize("item", [None, 3.0, [torch.ones(2)]], ids=["none", "float", "list"])
def test_non_tensors_are_refused(item):
    with pytest.raises(RuntimeError, match="tensors must hold tensors only"):
        _ext._C.StateWatch([], [], [torch.ones(2), item])
