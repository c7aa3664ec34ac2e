"""Block inference plans and the whole model's in-place inference (fusedres.modules,
fusedres.models.resnet).

A fused block under autograd off runs from a plan made by its last call (each unit's inference
plan, under one key for the block); a FusedResNet lets each block write its output into its
input when no one else can see that tensor. These tests change each thing the block key holds
and check the output follows eager's block, check that no caller's tensor is ever written, and
that a hook shown a block's input or output sees what eager's would (with the guard that makes
this so shown to matter).
"""

import copy
import gc
import weakref

import pytest
import torch

from conftest import CPU_FUSED_BACKENDS, assert_oracle_close
import fusedres
from fusedres import FusedBasicBlock, FusedBottleneck, modules, reference
from fusedres.models.resnet import FusedResNet
from fusedres.ops import unit as unit_module


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _block(kind, backend):
    """A block with a downsample (stride 2, Bottleneck) or an identity branch (BasicBlock)."""
    if kind == "bottleneck":
        ds = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False),
                                 torch.nn.BatchNorm2d(32))
        block = FusedBottleneck(16, 8, stride=2, downsample=ds, backend=backend)
    else:
        block = FusedBasicBlock(16, 16, backend=backend)
    return _randomize_bn(block)


def _eager_block(block):
    return fusedres.to_eager(copy.deepcopy(block)).eval()


def _assert_matches_eager(out, eager, x):
    """The tolerance rule of docs/design.md: eager in the same dtype and the float64 oracle."""
    with torch.no_grad():
        expected = eager(x)
        oracle = reference.upcast(eager)(x.double())
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_oracle_close(out, expected, oracle)


def _block_change(block, x, what):
    """Changes one thing the block plan's key holds; returns the input to call with next."""
    with torch.no_grad():
        if what == "replaced_conv2_weight":
            block.conv2.weight = torch.nn.Parameter(block.conv2.weight.detach() * -1.5)
        elif what == "conv1_weight_in_place":
            block.conv1.weight.mul_(-2.0)  # the fold cache follows the version counter
        elif what == "conv1_weight_data_swapped":
            block.conv1.weight.data = block.conv1.weight.data * -2.0  # same version, new storage
        elif what == "replaced_bn2":
            block.bn2 = _randomize_bn(torch.nn.BatchNorm2d(block.bn2.num_features))
        elif what == "last_bn_eps":
            (block.bn3 if hasattr(block, "bn3") else block.bn2).eps = 0.5
        elif what == "bn1_training":
            block.bn1.train()  # batch statistics, still under no_grad
        elif what == "conv2_hook":
            block.conv2.register_forward_hook(lambda m, args, out: None)
        elif what == "batch_size":
            return torch.randn(3, *x.shape[1:])
        elif what == "layout":
            return x.contiguous(memory_format=torch.channels_last)
        elif what == "dtype":
            block.double()
            return x.double()
        elif what == "global_backend":
            block.backend = None  # then follows set_backend (the test sets "torch_ops")
    return x


BLOCK_CHANGES = ["replaced_conv2_weight", "conv1_weight_in_place", "conv1_weight_data_swapped",
                 "replaced_bn2", "last_bn_eps", "bn1_training", "conv2_hook", "batch_size",
                 "layout", "dtype", "global_backend"]


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
@pytest.mark.parametrize("what", BLOCK_CHANGES)
def test_block_plan_follows_what_its_key_holds(backend, kind, what):
    block = _block(kind, backend)
    x = torch.randn(2, 16, 8, 8)
    try:
        with torch.no_grad():
            before = block(x)
            assert torch.equal(block(x), before)  # from the plan now (its key matched)
            assert torch.equal(block(x), before)  # from the plan (its state watch answered)
            x = _block_change(block, x, what)
            if what == "global_backend":
                fusedres.set_backend("torch_ops")
            after = block(x)
        if what in ("replaced_conv2_weight", "conv1_weight_in_place", "conv1_weight_data_swapped",
                    "replaced_bn2", "last_bn_eps", "bn1_training"):
            assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3), "changed nothing"
        assert after.is_contiguous(memory_format=torch.channels_last) == (what == "layout")
        eager = _eager_block(block)
        eager.bn1.train(block.bn1.training)
        _assert_matches_eager(after, eager, x)
    finally:
        fusedres.set_backend(None)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_block_inference_never_writes_its_input(backend, kind, layout):
    """A block called by anyone but FusedResNet keeps its input: the caller may read it again."""
    block = _block(kind, backend).to(memory_format=layout)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=layout)
    kept = x.clone()
    with torch.no_grad():
        outs = [block(x) for _ in range(3)]
    assert torch.equal(x, kept)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    _assert_matches_eager(outs[0], _eager_block(block), x)


def _models(arch, backend, layout):
    torch.manual_seed(0)
    fused = _randomize_bn(getattr(fusedres.models, arch)(backend=backend))
    fused = fused.to(memory_format=layout)
    return fused, fusedres.to_eager(copy.deepcopy(fused)).eval()


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_model_inference_matches_eager_and_keeps_its_input(backend, arch, layout, mode):
    fused, eager = _models(arch, backend, layout)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=layout)
    kept = x.clone()
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        outs = [fused(x) for _ in range(3)]
    assert torch.equal(x, kept)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    _assert_matches_eager(outs[0], eager, x)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_model_inference_writes_blocks_outputs_into_their_inputs(monkeypatch, layout):
    """Without hooks, a planned call of the ``cpu`` backend runs every unit on channels_last
    activations, whatever the input's layout, and every block's last unit with its identity
    branch marked dead (what lets oneDNN accumulate into it)."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    fused, _ = _models("resnet18", "cpu", layout)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=layout)
    dead, channels_last = [], []
    real_run = unit_module.InferencePlan.run

    def spy(self, x, residual, residual_is_dead=False):
        channels_last.append(x.is_contiguous(memory_format=torch.channels_last))
        if residual is not None:
            dead.append(residual_is_dead)
        return real_run(self, x, residual, residual_is_dead)

    with torch.no_grad():
        fused(x)
        monkeypatch.setattr(unit_module.InferencePlan, "run", spy)
        fused(x)
    assert dead == [True] * 8  # resnet18: 8 blocks, each from its plan
    assert channels_last == [True] * 20  # the stem, 8 blocks x 2 units, 3 downsamples


def _hook(where, fused, seen):
    """Registers a hook that keeps (not copies) the tensor it is shown; returns the eager module
    and hook kind to compare with."""
    store = lambda m, args, out=None: seen.append(args[0] if out is None else out)  # noqa: E731
    if where == "block_output":
        return fused.layer1[0].register_forward_hook(store), ("layer1", 0, "output")
    if where == "next_block_input":
        return fused.layer1[1].register_forward_pre_hook(store), ("layer1", 1, "input")
    if where == "stage_output":
        return fused.layer1.register_forward_hook(store), ("layer1", None, "output")
    if where == "global":
        return (torch.nn.modules.module.register_module_forward_hook(
            lambda m, args, out: seen.append(out) if m is fused.layer2[0] else None),
            ("layer2", 0, "output"))
    raise ValueError(where)


def _eager_tensor(eager, x, layer, index, kind):
    seen = []
    module = getattr(eager, layer) if index is None else getattr(eager, layer)[index]
    if kind == "output":
        handle = module.register_forward_hook(lambda m, args, out: seen.append(out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        eager(x)
    handle.remove()
    return seen[0]


HOOK_PLACES = ["block_output", "next_block_input", "stage_output", "global"]


def _kept_by_hook(backend, where):
    """Two no-grad calls of a channels_last resnet18 with a hook at ``where`` that keeps the
    tensor it is shown. Returns (what the hook kept in the last call, or None where it never
    ran; what eager's hook at the same place is shown)."""
    fused, eager = _models("resnet18", backend, torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    seen = []
    handle, (layer, index, kind) = _hook(where, fused, seen)
    try:
        with torch.no_grad():
            for _ in range(2):
                seen.clear()
                fused(x)
    finally:
        handle.remove()
    return (seen[0] if seen else None), _eager_tensor(eager, x, layer, index, kind)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("where", HOOK_PLACES)
def test_hooks_see_what_eager_shows_them(backend, where):
    """A hook that keeps a block's input or output sees, after the call, what eager's hook sees:
    with hooks the model does not write blocks' outputs into their inputs."""
    kept, expected = _kept_by_hook(backend, where)
    assert kept is not None, "the hook did not run"
    torch.testing.assert_close(kept, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("where", HOOK_PLACES)
def test_hooks_added_after_the_model_plan_run(backend, where):
    """A hook registered once the model runs from its plan (and its state watch) runs in the next
    call and is shown what eager's hook is shown."""
    fused, eager = _models("resnet18", backend, torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused(x)
        fused(x)  # from the plan
    seen = []
    handle, (layer, index, kind) = _hook(where, fused, seen)
    try:
        with torch.no_grad():
            fused(x)
    finally:
        handle.remove()
    assert seen, "the hook did not run"
    expected = _eager_tensor(eager, x, layer, index, kind)
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", HOOK_PLACES)
def test_hooks_would_see_overwritten_tensors_without_the_guard(monkeypatch, where):
    """The hook test above can fail: with the guard forced open, the model runs its blocks
    without their hooks, or a hook keeps a tensor that a later block overwrites."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    monkeypatch.setattr(FusedResNet, "_activations_stay_inside", lambda self: True)
    kept, expected = _kept_by_hook("cpu", where)
    assert kept is None or not torch.allclose(kept, expected, rtol=1e-2, atol=1e-2)


class _KeepingBlock(FusedBasicBlock):
    """A user's block subclass that keeps its input (and a copy of it) to read later."""

    def forward(self, x):
        self.kept, self.kept_copy = x, x.clone()
        return super().forward(x)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("change", ["maxpool_identity", "fc_replaced", "subclassed_block"])
def test_model_inference_with_replaced_modules(backend, change):
    """Models edited as users edit them (no max pool for small images, a new head, a block
    subclass that keeps its input) give eager's output and keep every tensor they hand out."""
    fused, eager = _models("resnet18", backend, torch.channels_last)
    if change == "maxpool_identity":
        fused.maxpool = eager.maxpool = torch.nn.Identity()
    elif change == "fc_replaced":
        fused.fc = torch.nn.Sequential(torch.nn.Linear(512, 10), torch.nn.ReLU())
        eager.fc = copy.deepcopy(fused.fc)
    else:
        block = _KeepingBlock.__new__(_KeepingBlock)
        block.__dict__.update(fused.layer2[1].__dict__)
        fused.layer2[1] = block
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    kept = x.clone()
    with torch.no_grad():
        for _ in range(2):
            out = fused(x)
    assert torch.equal(x, kept)
    if change == "subclassed_block":
        assert torch.equal(block.kept, block.kept_copy)
    _assert_matches_eager(out, eager, x)


def _model_change(fused, eager, x, what):
    """Changes one thing the whole-model plan's key holds, in both models; returns the input
    to call with next."""
    with torch.no_grad():
        if what == "stem_weight_in_place":
            for m in (fused, eager):
                m.conv1.weight.mul_(-2.0)
        elif what == "stem_bn_eps":
            fused.bn1.eps = eager.bn1.eps = 0.5
        elif what == "replaced_block":
            torch.manual_seed(1)
            new = _randomize_bn(FusedBasicBlock(128, 128, backend=fused.layer2[1].backend))
            fused.layer2[1] = new
            eager.layer2[1] = _eager_block(new)
        elif what == "layer4_bn_in_place":
            for m in (fused, eager):
                m.layer4[1].bn2.running_mean.add_(1.0)
        elif what == "layer2_weight_data_swapped":
            for m in (fused, eager):  # same version, new storage
                m.layer2[0].conv2.weight.data = m.layer2[0].conv2.weight.data * -1.5
        elif what == "maxpool_stride":
            fused.maxpool.stride = eager.maxpool.stride = 1
        elif what == "stem_weight_replaced":
            for m in (fused, eager):
                m.conv1.weight = torch.nn.Parameter(m.conv1.weight.detach() * -1.5)
        elif what == "layer3_bn_train":
            for m in (fused, eager):
                m.layer3[0].bn2.train()  # batch statistics, still under no_grad
        elif what == "batch_size":
            return torch.randn(3, *x.shape[1:])
    return x


MODEL_CHANGES = ["stem_weight_in_place", "stem_bn_eps", "replaced_block", "layer4_bn_in_place",
                 "layer2_weight_data_swapped", "maxpool_stride", "stem_weight_replaced",
                 "layer3_bn_train", "batch_size"]


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("what", MODEL_CHANGES)
def test_model_plan_follows_what_its_key_holds(backend, what):
    """A FusedResNet's second inference call runs its whole-model plan; after each change of
    something the plan's key holds, the output follows eager's."""
    fused, eager = _models("resnet18", backend, torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = fused(x)
        assert torch.equal(fused(x), before)  # from the plan now
        x = _model_change(fused, eager, x, what)
        after = fused(x)
    if what != "batch_size":
        assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3), "changed nothing"
    _assert_matches_eager(after, eager, x)


def test_model_plan_skips_the_checks_and_the_block_lookups(monkeypatch):
    """A call that finds the model plan runs neither check_chain nor any block's plan lookup:
    its key holds what they read."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    from fusedres.models import resnet as resnet_module
    fused, _ = _models("resnet18", "cpu", torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    real_check, real_block = resnet_module.check_chain, resnet_module.block_forward_with_plan
    monkeypatch.setattr(resnet_module, "check_chain",
                        lambda *a: calls.append("check") or real_check(*a))
    monkeypatch.setattr(resnet_module, "block_forward_with_plan",
                        lambda *a, **k: calls.append("block") or real_block(*a, **k))
    with torch.no_grad():
        first = fused(x)
        assert calls == ["check"] + ["block"] * 8
        calls.clear()
        second = fused(x)
        assert calls == []
        fused.layer3[0].bn1.register_forward_hook(lambda *a: None)  # in a block key
        fused(x)
        assert calls == ["check"] + ["block"] * 8
    assert torch.equal(first, second)


def test_model_plan_follows_clear_fold_cache_after_a_data_edit():
    """``.data`` edits bypass version counters; clear_fold_cache drops the plans holding folded
    weights too (the documented remedy), so the model's output follows."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    from fusedres.ops import fold
    fused, eager = _models("resnet18", "cpu", torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stale = fused(x)
        fused.layer1[0].conv1.weight.data.mul_(-3.0)
        eager.layer1[0].conv1.weight.data.mul_(-3.0)
        assert torch.equal(fused(x), stale)
        fold.clear_fold_cache()
        after = fused(x)
    _assert_matches_eager(after, eager, x)


def _count_calls(monkeypatch, owner, name: str) -> list:
    """A list that gets an entry each time ``owner.name`` (a function of a module or a class)
    is called."""
    calls = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _count_key_reads(monkeypatch) -> list:
    """A list that gets an entry each time a FusedResNet reads its inference key."""
    return _count_calls(monkeypatch, FusedResNet, "_inference_key")


def test_model_plan_watch_skips_the_key_until_something_changes(monkeypatch):
    """Once the model plan exists, calls read no key (the plan's state watch answers) until
    something the key reads changes; then one call reads it, and the next ones again none."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    fused, eager = _models("resnet18", "cpu", torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    keys = _count_key_reads(monkeypatch)
    with torch.no_grad():
        for _ in range(3):
            fused(x)
        assert len(keys) == 1
        fused.eval()  # rebinds every module's training flag to the same value
        fused(x)
        assert len(keys) == 1
        for m in (fused, eager):
            m.layer1[0].conv1.weight.add_(0.5)
        out = fused(x)
        assert len(keys) == 2
        assert torch.equal(fused(x), out)
        assert len(keys) == 2
    _assert_matches_eager(out, eager, x)


def _count_block_key_reads(monkeypatch) -> list:
    """A list that gets an entry each time a block reads its inference key."""
    return _count_calls(monkeypatch, modules, "block_state_key")


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_block_plan_watch_skips_the_key_until_something_changes(monkeypatch, kind):
    """A block called on its own (a detection backbone's, outside a FusedResNet's plan) reads its
    key in its first two calls (plan made, key matched: the watch starts), then none until
    something the key reads changes; then two calls read it again, and the next ones none."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    block = _block(kind, "cpu")
    eager = _eager_block(block)
    x = torch.randn(2, 16, 8, 8)
    keys = _count_block_key_reads(monkeypatch)
    with torch.no_grad():
        first = block(x)
        assert torch.equal(block(x), first)
        assert len(keys) == 2
        for _ in range(3):
            assert torch.equal(block(x), first)
        assert len(keys) == 2
        for m in (block, eager):
            m.conv1.weight.mul_(-2.0)
        out = block(x)
        assert torch.equal(block(x), out)
        assert len(keys) == 4
        assert torch.equal(block(x), out)
        assert len(keys) == 4
        assert not torch.allclose(out, first, rtol=1e-3, atol=1e-3), "changed nothing"
    _assert_matches_eager(out, eager, x)


def _assert_freed_once_dropped(make_called, plans):
    """The module ``make_called()`` returns has a plan with a state watch in ``plans`` (a
    weak-keyed cache), and dropping the last reference to the module frees it."""
    module = make_called()
    kept = plans.plans(module)
    assert kept and all(plan.watch is not None for plan in kept)
    ref = weakref.ref(module)
    del module
    gc.collect()
    assert ref() is None


def test_block_plan_does_not_keep_its_block_alive():
    """The block plan's state watch holds the block's ``__dict__`` and its children, never the
    block, so a dropped block is freed (its plan cache is weak-keyed)."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")

    def called_block():
        block = _block("bottleneck", "cpu")
        with torch.no_grad():
            for _ in range(2):
                block(torch.randn(2, 16, 8, 8))
        return block
    _assert_freed_once_dropped(called_block, modules._BLOCK_PLANS)


def test_model_plan_does_not_keep_its_model_alive():
    """The plan cache is weak-keyed by the model; the plan's state watch holds the model's
    ``__dict__``, never the model, so a dropped model is freed."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    from fusedres.models import resnet as resnet_module

    def called_model():
        fused, _ = _models("resnet18", "cpu", torch.channels_last)
        with torch.no_grad():
            fused(torch.randn(2, 3, 32, 32))
        return fused
    _assert_freed_once_dropped(called_model, resnet_module._MODEL_PLANS)


def test_model_plan_watch_follows_the_global_backend(monkeypatch):
    """A block without a backend of its own follows the global choice, which no watched module
    holds: changing it makes the next call read the key again (and run the new backend)."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    fused, eager = _models("resnet18", "cpu", torch.channels_last)
    fused.layer2[0].backend = None
    x = torch.randn(2, 3, 32, 32)
    keys = _count_key_reads(monkeypatch)
    try:
        with torch.no_grad():
            fused(x)
            fused(x)
            assert len(keys) == 1
            fusedres.set_backend("torch_ops")
            out = fused(x)
            assert len(keys) == 2
    finally:
        fusedres.set_backend(None)
    _assert_matches_eager(out, eager, x)


def test_model_plans_kept_per_input_size(monkeypatch):
    """Inputs of several sizes in turn (multi-scale inference, an eval loop's smaller last batch)
    keep a plan each: after one call per size no call checks anything again; after a change of
    something the keys hold, every size's output follows eager's, and only plans made from the
    new state are kept."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    from fusedres.models import resnet as resnet_module
    fused, eager = _models("resnet18", "cpu", torch.channels_last)
    xs = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 32), torch.randn(1, 3, 32, 40)]
    checks = _count_calls(monkeypatch, resnet_module, "check_chain")
    with torch.no_grad():
        first = [fused(x) for x in xs]
        assert len(checks) == 3
        for _ in range(2):
            for x, out in zip(xs, first):
                assert torch.equal(fused(x), out)
        assert len(checks) == 3
        for m in (fused, eager):
            m.layer2[0].conv1.weight.add_(0.5)
        fused(xs[1])
        assert len(resnet_module._MODEL_PLANS.plans(fused)) == 1  # the old state's dropped
        after = [fused(x) for x in xs]
        assert len(checks) == 6
    assert len(resnet_module._MODEL_PLANS.plans(fused)) == 3
    for x, out, before in zip(xs, after, first):
        assert not torch.allclose(out, before, rtol=1e-3, atol=1e-3), "changed nothing"
        _assert_matches_eager(out, eager, x)


def test_model_plans_keep_the_most_recently_used_sizes(monkeypatch):
    """A model keeps the plans of its INPUT_SIZES_KEPT most recently used input sizes: a call of
    one more size drops the least recently used one's plan, whose next call checks again."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    from fusedres.models import resnet as resnet_module
    from fusedres.ops.fold import INPUT_SIZES_KEPT
    fused, eager = _models("resnet18", "cpu", torch.channels_last)
    xs = [torch.randn(1, 3, 32 + 8 * i, 32) for i in range(INPUT_SIZES_KEPT + 1)]
    checks = _count_calls(monkeypatch, resnet_module, "check_chain")
    with torch.no_grad():
        for x in xs[:-1]:
            fused(x)
        fused(xs[0])  # now the most recently used: xs[1] is the least
        assert len(checks) == INPUT_SIZES_KEPT
        fused(xs[-1])
        assert len(checks) == INPUT_SIZES_KEPT + 1
        assert len(resnet_module._MODEL_PLANS.plans(fused)) == INPUT_SIZES_KEPT
        fused(xs[0])
        assert len(checks) == INPUT_SIZES_KEPT + 1
        out = fused(xs[1])
        assert len(checks) == INPUT_SIZES_KEPT + 2
    _assert_matches_eager(out, eager, xs[1])


def test_no_input_size_kept(monkeypatch):
    """INPUT_SIZES_KEPT = 0 keeps no plan: every call checks again, and is right."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    from fusedres.models import resnet as resnet_module
    from fusedres.ops import fold
    monkeypatch.setattr(fold, "INPUT_SIZES_KEPT", 0)
    fused, eager = _models("resnet18", "cpu", torch.channels_last)
    x = torch.randn(1, 3, 32, 32)
    checks = _count_calls(monkeypatch, resnet_module, "check_chain")
    with torch.no_grad():
        outs = [fused(x) for _ in range(3)]
    assert len(checks) == 3
    assert resnet_module._MODEL_PLANS.plans(fused) == []
    for out in outs:
        _assert_matches_eager(out, eager, x)


def _assert_plans_kept_per_input_size(module, eager, xs, checks, change):
    """``module`` called with each of ``xs`` in turn is checked (``checks`` grows) once per
    size, then runs its plans; after ``change(m)`` on it and on ``eager``, once more per size,
    and every size's output follows eager's."""
    with torch.no_grad():
        first = [module(x) for x in xs]
        for _ in range(3):
            for x, out in zip(xs, first):
                assert torch.equal(module(x), out)
        assert len(checks) == len(xs)
        for m in (module, eager):
            change(m)
        after = [module(x) for x in xs]
        assert len(checks) == 2 * len(xs)
    for x, out, before in zip(xs, after, first):
        assert not torch.allclose(out, before, rtol=1e-3, atol=1e-3), "changed nothing"
        _assert_matches_eager(out, eager, x)


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_block_plans_kept_per_input_size(monkeypatch, kind):
    """A block called on its own with inputs of two sizes in turn (a detection backbone fed
    images of two sizes) keeps a plan for each: after one call per size no call checks the
    block again; after a weight changes, both sizes' outputs follow eager's."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    block = _block(kind, "cpu")
    _assert_plans_kept_per_input_size(
        block, _eager_block(block), [torch.randn(2, 16, 8, 8), torch.randn(1, 16, 12, 8)],
        _count_calls(monkeypatch, modules, "_check_block"), lambda m: m.conv1.weight.mul_(-2.0))


def test_unit_plans_kept_per_input_size(monkeypatch):
    """A FusedConvBNReLU called with inputs of two sizes in turn keeps a plan for each: after
    one call per size no call checks its inputs again; after a running statistic changes, both
    sizes' outputs follow eager's."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    torch.manual_seed(0)
    unit = _randomize_bn(fusedres.FusedConvBNReLU(16, 16, 3, backend="cpu"))
    _assert_plans_kept_per_input_size(
        unit, fusedres.to_eager(copy.deepcopy(unit)).eval(),
        [torch.randn(2, 16, 8, 8), torch.randn(1, 16, 6, 10)],
        _count_calls(monkeypatch, unit_module, "check_unit_inputs"),
        lambda m: m.bn.running_mean.add_(1.0))


def test_threads_share_a_models_plans(monkeypatch):
    """Threads running one model's inference at once, on inputs of sizes that keep evicting each
    other's plans and folds (one size kept), all get eager's outputs and no error: no plan or
    fold is shared in a way that lets one call's run disturb another's."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is unusable here")
    import sys
    import threading

    from fusedres.ops import fold
    monkeypatch.setattr(fold, "INPUT_SIZES_KEPT", 1)
    fused, eager = _models("resnet18", "cpu", torch.channels_last)
    xs = [torch.randn(1, 3, 32, 32), torch.randn(1, 3, 40, 32), torch.randn(2, 3, 32, 48)]
    with torch.no_grad():
        expected = [eager(x) for x in xs]
    errors, outputs = [], []

    def work(first):
        try:
            with torch.no_grad():
                for i in range(24):
                    k = (first + i) % len(xs)
                    outputs.append((k, fused(xs[k])))
        except Exception as e:  # reported below with the test's failure
            errors.append(e)

    threads = [threading.Thread(target=work, args=(first,)) for first in range(3)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads every few bytecodes: races show up
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert len(outputs) == 72
    for k, out in outputs:
        torch.testing.assert_close(out, expected[k], rtol=1e-4, atol=1e-4)
