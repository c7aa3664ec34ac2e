"""The block-level op (fusedres.ops.block): where it runs, exactness against the float64 oracle,
gradcheck, double backward, the activations it keeps for backward, torch.compile and
torch.export, failing calls, and the F3 hook a backend may provide.

Exactness is checked in float64 through the fused kernels, where a ReLU-mask flip cannot hide an
error (docs/design.md section 6); tests/test_models.py and tests/test_ecosystem.py run the same
blocks, now on this op by default, in float32 and under autocast.
"""

import contextlib
import copy
import functools

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import fusedres
from conftest import (ATOL, CPU_FUSED_BACKENDS, TorchOpsBackend, assert_oracle_close,
                      rel_l2_err)
from fusedres import FusedBasicBlock, FusedBottleneck, models, reference
from fusedres.backend import BlockOps, get_backend
from fusedres.ops import block as block_op

# (kind, inplanes, planes, stride, groups, base_width, dilation, H): every structural case.
CASES = {
    "basic-identity": ("basic", 8, 8, 1, 1, 64, 1, 7),
    "basic-s2-downsample": ("basic", 8, 16, 2, 1, 64, 1, 9),
    "bottleneck-identity": ("bottleneck", 32, 8, 1, 1, 64, 1, 6),
    "bottleneck-s2-downsample": ("bottleneck", 16, 8, 2, 1, 64, 1, 7),
    "resnext-groups": ("bottleneck", 32, 8, 1, 4, 16, 1, 5),
    "bottleneck-dilation2": ("bottleneck", 32, 8, 1, 1, 64, 2, 7),
}
MODES = ["bn_act", "conv1"]
F64 = torch.float64


def _randomize_bn(module):
    """Non-trivial affine parameters and running statistics in every BatchNorm2d."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    return module


def make_block(case, backend=None, recompute=None, norm_layer=None):
    """The block of CASES[case] (torchvision's when ``backend`` is None, else the fused one)."""
    kind, inplanes, planes, stride, groups, base_width, dilation, _ = CASES[case]
    cls = {"basic": (reference.BasicBlock, FusedBasicBlock),
           "bottleneck": (reference.Bottleneck, FusedBottleneck)}[kind][backend is not None]
    out = planes * cls.expansion
    norm = norm_layer or nn.BatchNorm2d
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(reference.conv1x1(inplanes, out, stride), norm(out))
    fused = {} if backend is None else {"backend": backend, "recompute": recompute}
    return cls(inplanes, planes, stride, downsample, groups, base_width, dilation, norm, **fused)


def make_pair(case, backend, recompute=None, norm_layer=None, dtype=torch.float32):
    """(fused block, eager twin) of CASES[case] with the same parameters and buffers."""
    eager = _randomize_bn(make_block(case, norm_layer=norm_layer))
    fused = make_block(case, backend, recompute, norm_layer)
    fused.load_state_dict(eager.state_dict())
    return fused.to(dtype), eager.to(dtype)


def make_input(case, dtype=torch.float32, channels_last=False, batch=2):
    _, inplanes, *_, h = CASES[case]
    x = torch.randn(batch, inplanes, h, h + 1, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def run(module, x, owner=None):
    """Forward + backward with a fixed random output gradient.

    Returns:
        ({"y", "dx", "grad <parameter>"..., "<buffer>"...}, the output's grad_fn class name);
        parameters and buffers are read from ``owner`` (default: the module itself; the
        original module of a compiled one).
    """
    owner = module if owner is None else owner
    x = x.detach().clone().requires_grad_()
    owner.zero_grad(set_to_none=True)
    y = module(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    y.backward(dy.to(y.dtype))
    out = {"y": y.detach(), "dx": x.grad}
    out.update({f"grad {n}": p.grad for n, p in owner.named_parameters() if p.grad is not None})
    out.update({n: b.clone() for n, b in owner.named_buffers()})
    return out, type(y.grad_fn).__name__


def assert_matches_oracle(fused, eager, x, dtype) -> str:
    """Outputs, gradients and buffers of ``fused`` within docs/design.md's rule: against eager in
    ``dtype`` and the float64 oracle (in float64, eager is the oracle: the bound is the atol).

    Returns:
        The class name of the fused output's grad_fn.
    """
    oracle = reference.upcast(eager)
    got, grad_fn = run(fused, x)
    ref, _ = run(eager, x)
    exact, _ = run(oracle, x.double())
    assert got.keys() == exact.keys()
    for name, value in exact.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(got[name], value), name
        else:
            assert_oracle_close(got[name], ref[name], value, name, atol=ATOL[dtype])
    return grad_fn


def saved_activation_bytes(module, forward):
    """Bytes of the distinct storages autograd keeps for backward while ``forward()`` runs,
    the module's parameters and buffers excluded (saved_tensors_hooks sees every saved tensor;
    one storage saved by several ops counts once).

    Storages are told apart by their data pointer, or under FakeTensorMode (no data) by the
    storage object itself.
    """

    def key(t):
        storage = t.untyped_storage()
        return storage._cdata if isinstance(t, FakeTensor) else storage.data_ptr()

    state = {key(t) for t in [*module.parameters(), *module.buffers()]}
    kept = {}

    def pack(t):
        if key(t) not in state:
            kept[key(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()  # kept alive until counted: a freed storage's address may be reused
    del out
    return sum(kept.values())


# -- where the op runs ------------------------------------------------------------------------

class FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d, as fusedres recognises it (by name and buffers)."""

    def __init__(self, n):
        super().__init__()
        for name, value in (("weight", torch.ones(n)), ("bias", torch.zeros(n)),
                            ("running_mean", torch.zeros(n)), ("running_var", torch.ones(n))):
            self.register_buffer(name, value)
        self.eps = 1e-5

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class _Plus(nn.Module):
    """A custom downsample (not torchvision's conv1x1 + BatchNorm2d pair)."""

    def __init__(self, inplanes, out, stride):
        super().__init__()
        self.pair = nn.Sequential(reference.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))

    def forward(self, x):
        return self.pair(x) + 1.0


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_block_op_runs_in_training_and_nowhere_else(backend):
    fused, _ = make_pair("bottleneck-s2-downsample", backend)
    x = make_input("bottleneck-s2-downsample")
    assert run(fused, x)[1] == "_BlockFunctionBackward"
    fused.recompute = "off"
    assert run(fused, x)[1] != "_BlockFunctionBackward"
    fused.recompute = None
    fused.bn2.eval()  # frozen statistics in one unit: the per-unit path
    assert run(fused, x)[1] != "_BlockFunctionBackward"
    fused.eval()
    assert run(fused, x)[1] != "_BlockFunctionBackward"
    frozen, _ = make_pair("bottleneck-identity", backend, norm_layer=FrozenBatchNorm2d)
    assert run(frozen.train(), make_input("bottleneck-identity"))[1] != "_BlockFunctionBackward"
    custom = FusedBottleneck(16, 8, 2, _Plus(16, 32, 2), backend=backend)
    assert run(custom, x)[1] != "_BlockFunctionBackward"


def test_recompute_mode_from_argument_and_environment(monkeypatch):
    monkeypatch.delenv(block_op.RECOMPUTE_ENV, raising=False)
    assert block_op.recompute_mode() == "bn_act"
    assert block_op.recompute_mode("conv1") == "conv1"
    for env, mode in (("0", "off"), ("1", "bn_act"), ("conv1", "conv1"), ("off", "off")):
        monkeypatch.setenv(block_op.RECOMPUTE_ENV, env)
        assert block_op.recompute_mode() == mode
        assert block_op.recompute_mode("bn_act") == "bn_act"  # a module's own choice wins
    monkeypatch.setenv(block_op.RECOMPUTE_ENV, "2")
    with pytest.raises(ValueError, match="FUSEDRES_BLOCK_RECOMPUTE must be one of"):
        block_op.recompute_mode()
    with pytest.raises(ValueError, match="recompute must be one of"):
        FusedBottleneck(16, 4, recompute="y")


def test_environment_switches_blocks_to_the_per_unit_path(monkeypatch):
    fused, _ = make_pair("basic-identity", "torch_ops")
    monkeypatch.setenv(block_op.RECOMPUTE_ENV, "0")
    assert run(fused, make_input("basic-identity"))[1] != "_BlockFunctionBackward"


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_padding_beyond_half_span_runs_unit_by_unit(backend):
    """A block convolution padded beyond its kernel's half-span (conv1 3x3 padding 2, conv2
    padding 0: the shapes still meet) takes the per-unit path, where the units pad explicitly
    (fusedres.backend.explicit_padding), and still follows the oracle."""
    fused, eager = make_pair("basic-identity", backend, dtype=F64)
    for block in (fused, eager):
        block.conv1.padding, block.conv2.padding = (2, 2), (0, 0)
    grad_fn = assert_matches_oracle(fused, eager, make_input("basic-identity", F64), F64)
    assert grad_fn != "_BlockFunctionBackward"


# -- exactness --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_float64_matches_oracle(backend, mode, case, channels_last):
    fused, eager = make_pair(case, backend, mode, dtype=F64)
    grad_fn = assert_matches_oracle(fused, eager, make_input(case, F64, channels_last), F64)
    assert grad_fn == "_BlockFunctionBackward"


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("case", ["bottleneck-s2-downsample", "resnext-groups"])
def test_block_float32_conv1_mode_matches_oracle(backend, case):
    """The opt-in mode in float32 (the default mode runs in tests/test_models.py)."""
    fused, eager = make_pair(case, backend, "conv1")
    with reference.oracle_convolutions("cpu"):
        grad_fn = assert_matches_oracle(fused, eager, make_input(case, channels_last=True),
                                        torch.float32)
    assert grad_fn == "_BlockFunctionBackward"


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("variant", ["affine-false", "momentum-none", "untracked",
                                     "zero-init-residual"])
def test_batchnorm_variants_float64(backend, variant):
    """BatchNorm without gamma/beta, the cumulative average (which reads num_batches_tracked),
    no running statistics, and a zero gamma in the last unit (zero_init_residual)."""
    norm = {"affine-false": functools.partial(nn.BatchNorm2d, affine=False),
            "momentum-none": functools.partial(nn.BatchNorm2d, momentum=None),
            "untracked": functools.partial(nn.BatchNorm2d, track_running_stats=False)
            }.get(variant)
    fused, eager = make_pair("bottleneck-s2-downsample", backend, norm_layer=norm, dtype=F64)
    if variant == "zero-init-residual":
        for m in (fused, eager):
            nn.init.zeros_(m.bn3.weight)
    x = make_input("bottleneck-s2-downsample", F64)
    assert assert_matches_oracle(fused, eager, x, F64) == "_BlockFunctionBackward"


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("frozen", ["input", "conv1", "unit1", "downsample", "all-but-bn3"])
def test_gradients_of_a_subset_float64(backend, frozen):
    """Only some tensors take gradients: the others get none, the rest match the oracle."""
    fused, eager = make_pair("bottleneck-s2-downsample", backend, dtype=F64)
    oracle = reference.upcast(eager)
    x = make_input("bottleneck-s2-downsample", F64)
    results = []
    for m in (fused, oracle):
        off = {"input": [], "conv1": [m.conv1], "unit1": [m.conv1, m.bn1],
               "downsample": [m.downsample], "all-but-bn3": [m]}[frozen]
        for sub in off:
            sub.requires_grad_(False)
        if frozen == "all-but-bn3":
            m.bn3.requires_grad_(True)
        xi = x.clone().requires_grad_(frozen != "all-but-bn3")
        y = m(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=F64))
        results.append([xi.grad] + [p.grad for p in m.parameters()])
    assert any(g is not None for g in results[0])
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        if want is not None:
            assert_oracle_close(got, want, want, "gradient", atol=ATOL[F64])


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("case,mode", [("basic-s2-downsample", "bn_act"),
                                       ("bottleneck-s2-downsample", "bn_act"),
                                       ("resnext-groups", "conv1")])
def test_gradcheck_float64(backend, case, mode):
    """torch.autograd.gradcheck of the block op in float64: the input and every parameter.
    (Running statistics move on every call; batch statistics, and so the output, do not.)"""
    fused, _ = make_pair(case, backend, mode, dtype=F64)
    params = list(fused.parameters())
    x = make_input(case, F64).requires_grad_()

    def block(x, *_params):  # gradcheck perturbs the parameters in place
        y = fused(x)
        assert type(y.grad_fn).__name__ == "_BlockFunctionBackward"
        return y

    assert torch.autograd.gradcheck(block, (x, *params), fast_mode=True,
                                    check_batched_grad=False)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_autocast_bf16(backend):
    """CPU bf16 autocast through the op: output in bf16, fp32 parameter gradients, all within
    the rule. bf16 rounding flips ReLU masks in eager and fused alike, and where they flip
    differs, so one draw's gradient error is a sample: gradients are compared by relative L2
    (the rule's norm for them), each error averaged over three seeds (seed 0 alone puts bn3.bias at 3x eager's error,
    seed 2 puts eager's at 6x fused's)."""
    errors = {}
    for seed in range(3):
        torch.manual_seed(seed)
        fused, eager = make_pair("bottleneck-s2-downsample", backend)
        oracle = reference.upcast(eager)
        x = make_input("bottleneck-s2-downsample", channels_last=True, batch=4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, grad_fn = run(fused, x)
            ref, _ = run(eager, x)
        exact, _ = run(oracle, x.double())
        assert grad_fn == "_BlockFunctionBackward" and got["y"].dtype == torch.bfloat16
        for name, value in exact.items():
            if name.endswith("num_batches_tracked"):
                assert torch.equal(got[name], value), name
                continue
            assert got[name].dtype == ref[name].dtype, name
            if not (name.startswith("grad") or name == "dx"):
                assert_oracle_close(got[name].float(), ref[name].float(), value, name,
                                    atol=ATOL[torch.bfloat16])
                continue
            errors.setdefault(name, []).append((rel_l2_err(got[name].float(), value),
                                                rel_l2_err(ref[name].float(), value)))
    for name, pairs in errors.items():
        fused_err = sum(e for e, _ in pairs) / len(pairs)
        eager_err = sum(e for _, e in pairs) / len(pairs)
        assert fused_err <= 2 * eager_err + ATOL[torch.bfloat16], (name, pairs)


# -- double backward, failing calls -----------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_double_backward_raises_and_the_per_unit_path_supports_it(backend):
    """The op's backward raises at once under create_graph=True, naming the way out; the
    per-unit path then gives eager's second derivatives (a gradient penalty)."""
    fused, eager = make_pair("basic-s2-downsample", backend, dtype=F64)
    x = make_input("basic-s2-downsample", F64).requires_grad_()
    with pytest.raises(RuntimeError, match="double backward .* FUSEDRES_BLOCK_RECOMPUTE=0"):
        torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    fused.recompute = "off"
    penalties = []
    for m in (fused, eager):
        (gx,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(gx.square().sum(), m.conv1.weight)[0])
    torch.testing.assert_close(*penalties, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("bad,match", [
    (lambda b: setattr(b.bn3, "eps", 0.0), r"FusedBottleneck.conv3: batch_norm eps must be positive"),
    (lambda b: setattr(b.bn2, "running_var", torch.ones(5)),
     r"FusedBottleneck.conv2: BatchNorm running_var has shape \(5,\)"),
], ids=["bn3-eps", "bn2-running-var"])
def test_failing_inner_unit_leaves_state_untouched(backend, bad, match):
    """An inner unit's bad BatchNorm is refused before any unit runs, with the unit's name."""
    fused, _ = make_pair("bottleneck-s2-downsample", backend)
    bad(fused)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError), match=match):
        fused(make_input("bottleneck-s2-downsample").requires_grad_())
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failing call"


# -- memory kept for backward -----------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_bottleneck_keeps_exactly_z_and_not_y1_y2(backend):
    """One Bottleneck (identity shortcut): eager keeps x, z1, y1, z2, y2, z3, y3 and per-channel
    statistics; the op keeps all but y1 and y2, and in the conv1 mode all but z1 too."""
    fused, eager = make_pair("bottleneck-identity", backend)
    x = make_input("bottleneck-identity", batch=4).requires_grad_()
    with torch.no_grad():
        y1 = eager.relu(eager.bn1(eager.conv1(x)))
        y2 = eager.relu(eager.bn2(eager.conv2(y1)))
    act = y1.numel() * y1.element_size()
    assert y2.numel() == y1.numel()
    eager_bytes = saved_activation_bytes(eager, lambda: eager(x))
    for mode, dropped in (("off", 0), ("bn_act", 2 * act), ("conv1", 3 * act)):
        fused.recompute = mode
        assert saved_activation_bytes(fused, lambda: fused(x)) == eager_bytes - dropped, mode


def _resnet50_saved_ratios(backend, batch, size):
    """{mode: saved activation bytes of a fused resnet50 training forward / eager's}."""
    torch.manual_seed(0)
    fused = models.resnet50(backend=backend)
    eager = fusedres.to_eager(models.resnet50())
    x = torch.randn(batch, 3, size, size)
    eager_bytes = saved_activation_bytes(eager, lambda: eager(x))
    ratios = {}
    for mode in ("off", "bn_act", "conv1"):
        for m in fused.modules():
            if isinstance(m, (FusedBottleneck, FusedBasicBlock)):
                m.recompute = mode
        ratios[mode] = saved_activation_bytes(fused, lambda: fused(x)) / eager_bytes
    return ratios


def _assert_targets(ratios):
    assert ratios["off"] == pytest.approx(1.0, abs=0.002), ratios
    assert ratios["bn_act"] <= 0.85, ratios
    assert ratios["conv1"] <= 0.76, ratios


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_resnet50_saved_activations_targets(backend):
    """Issue 16's targets, at its size (batch 8, 112x112): the default mode keeps <= 0.85x
    eager's activations, the conv1 mode <= 0.76x; the per-unit path keeps what eager keeps.
    (The ratio depends on the size: at tiny images per-channel statistics weigh more.)"""
    _assert_targets(_resnet50_saved_ratios(backend, 8, 112))


def _triton_on_cpu_or_skip():
    backend = get_backend("triton")
    ok, why = backend.availability()
    if not ok or "cpu" not in backend.device_types:
        pytest.skip(f"the triton backend does not run CPU tensors here: {why}")


@pytest.mark.triton_interp
def test_resnet50_saved_activations_targets_triton():
    """The same count on the triton backend at the same size, under FakeTensorMode: the ops'
    fake kernels give the tensors each op returns (a real resnet50 step under the interpreter
    takes an hour); the next test ties those to the real kernels' outputs."""
    _triton_on_cpu_or_skip()
    with FakeTensorMode():
        ratios = _resnet50_saved_ratios("triton", 8, 112)
    _assert_targets(ratios)


@pytest.mark.triton_interp
@pytest.mark.parametrize("case", ["bottleneck-s2-downsample", "basic-s2-downsample"])
def test_triton_kernels_keep_what_the_count_assumes(case):
    """Under the interpreter, the triton backend's real kernels keep, in every mode, exactly the
    bytes that its fake kernels claim, and those the reference unit ops keep but for one thing:
    on the block op's F3 path each unit another loads keeps its statistics' [5, C] float32 rows
    whole (mean, invstd, and the scale and shift the next unit loaded, which backward's rebuild
    reuses instead of computing them again), where the unit ops keep mean and invstd, [C] each."""
    _triton_on_cpu_or_skip()
    for mode in ("off", "bn_act", "conv1"):
        counts = []
        for backend, fake in (("triton", False), ("torch_ops", False), ("triton", True)):
            with FakeTensorMode() if fake else contextlib.nullcontext():
                fused = make_block(case, backend, mode)
                x = make_input(case, channels_last=True).requires_grad_()
                counts.append(saved_activation_bytes(fused, lambda: fused(x)))
        loaded = [fused.bn1, fused.bn2] if hasattr(fused, "bn3") else [fused.bn1]
        rows_kept_whole = 0 if mode == "off" else sum(3 * bn.num_features * 4 for bn in loaded)
        assert counts[0] == counts[2] == counts[1] + rows_kept_whole, (mode, counts)


# -- whole models -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_model_float64_matches_oracle(backend, arch, training):
    """A whole model through the fused kernels in float64 against the float64 oracle, every
    parameter gradient and buffer (see docs/design.md section 6 on why not float32 here)."""
    torch.manual_seed(0)
    fused = _randomize_bn(getattr(models, arch)(backend=backend, num_classes=10)).double()
    eager = fusedres.to_eager(getattr(models, arch)(num_classes=10)).double()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=F64).contiguous(memory_format=torch.channels_last)
    fused.train(training)
    eager.train(training)
    assert_matches_oracle(fused, eager, x, F64)


def _sgd_steps(model, labels, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for x in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def resnet50_sgd_oracle():
    """(start state, labels, batches, end state) of three eager float64 SGD steps of a resnet50
    from seed 0: the same for every fused variant, so computed once per worker."""
    torch.manual_seed(0)
    start = models.resnet50(num_classes=10).double().state_dict()
    eager = fusedres.to_eager(models.resnet50(num_classes=10)).double()
    eager.load_state_dict(start)
    labels = torch.randint(0, 10, (8,))
    batches = [torch.randn(8, 3, 64, 64, dtype=F64) for _ in range(3)]
    return start, labels, batches, _sgd_steps(eager, labels, batches)


# One worker runs the four, so the oracle's steps run once.
@pytest.mark.slow
@pytest.mark.xdist_group("resnet50_sgd_oracle")
@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_sgd_steps_float64_track_oracle(backend, mode, resnet50_sgd_oracle):
    """Three SGD steps (momentum, weight decay) of a fused resnet50 end where eager's do.

    At 64x64 and batch 8 layer4's BatchNorm sees 32 values per channel: with fewer (32x32
    images, 4 per channel) the steps are so ill-conditioned (weights grow to ~100) that eager's
    own per-unit float64 rounding differences grow to 1e-5 in three steps, for any path."""
    start, labels, batches, eager_end = resnet50_sgd_oracle
    torch.manual_seed(0)
    fused = models.resnet50(backend=backend, num_classes=10).double()
    for (name, a), b in zip(fused.state_dict().items(), start.values(), strict=True):
        assert torch.equal(a, b), f"{name}: the fused model does not start where the oracle did"
    for m in fused.modules():
        if isinstance(m, FusedBottleneck):
            m.recompute = mode
    fused_end = _sgd_steps(fused, labels, batches)
    for (name, a), b in zip(fused_end.items(), eager_end.values(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name
        else:
            assert_oracle_close(a, b, b, name, atol=ATOL[F64])


@pytest.mark.triton_interp
@pytest.mark.parametrize("mode", MODES)
def test_triton_block_under_interpreter(mode):
    """The op on the triton backend (tiny shapes under the interpreter), fp32 against the rule."""
    ok, why = get_backend("triton").availability()
    if not ok or "cpu" not in get_backend("triton").device_types:
        pytest.skip(f"triton backend does not run CPU tensors here: {why}")
    fused, eager = make_pair("bottleneck-s2-downsample", "triton", mode)
    x = make_input("bottleneck-s2-downsample", channels_last=True)
    with reference.oracle_convolutions("cpu"):
        grad_fn = assert_matches_oracle(fused, eager, x, torch.float32)
    assert grad_fn == "_BlockFunctionBackward"


# -- torch.compile, torch.export --------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("mode,kept", [("bn_act", 1), ("conv1", 0)])
def test_compile_fullgraph_traces_the_block_op(backend, mode, kept):
    """fullgraph=True (a graph break raises) traces the op: of the tensors the compiled forward
    hands its backward, one has y1's shape in the default mode (z1; y1 is rebuilt) and none in
    the conv1 mode; outputs, gradients and running statistics equal the uncompiled block's,
    over two calls."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    forward_graphs = []

    def keep_forward(gm, _inputs):
        forward_graphs.append(gm)
        return make_boxed_func(gm)

    compiler = aot_autograd(fw_compiler=keep_forward,
                            bw_compiler=lambda gm, _inputs: make_boxed_func(gm))
    fused, eager = make_pair("bottleneck-s2-downsample", backend, mode)
    twin = copy.deepcopy(fused)
    compiled = torch.compile(twin, fullgraph=True, backend=compiler)
    x = make_input("bottleneck-s2-downsample")
    for _ in range(2):
        got, _ = run(compiled, x, owner=twin)
        want, grad_fn = run(fused, x)
        assert grad_fn == "_BlockFunctionBackward"
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    y1_shape = eager.conv1(x).shape
    (outputs,) = forward_graphs[0].graph.output_node().args
    shapes = [o.meta["val"].shape for o in outputs if hasattr(o, "meta") and "val" in o.meta]
    assert shapes.count(y1_shape) == kept, shapes


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_export_training_block(backend):
    """torch.export of a training-mode block: the program updates the running statistics and
    gives the module's output."""
    fused, _ = make_pair("bottleneck-s2-downsample", backend)
    twin = copy.deepcopy(fused)
    x = make_input("bottleneck-s2-downsample")
    program = torch.export.export(twin, (x,))
    exported = program.module()
    torch.testing.assert_close(exported(x), fused(x), rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(exported.named_buffers(), fused.buffers()):
        torch.testing.assert_close(a, b, msg=name)


# -- the F3 hook ------------------------------------------------------------------------------

class _F3Backend(TorchOpsBackend):
    """torch_ops with ``train_from_z``: the previous unit's y built from its z and coefficients
    (what an F3 convolution does while loading its operand), then the unit op."""

    name = "torch_ops_f3"
    # Bound here, so that a test counting the block op's own calls does not count these.
    coefficients = staticmethod(block_op.bn_act_coefficients)

    def __init__(self):
        self.calls = []

    def block_ops(self):
        ops = super().block_ops()

        def train_from_z(z_prev, scale_prev, shift_prev, weight, *rest):
            write_y = rest[-1]
            self.calls.append(write_y)
            # No coefficients: the block's first unit, whose input is the block input itself.
            x = z_prev if scale_prev is None else ops.bn_act_fwd(z_prev, scale_prev, shift_prev,
                                                                 None, True)
            y, z, mean, invstd = ops.train(x, weight, *rest[:-1])
            gamma, beta = rest[0], rest[1]
            scale, shift = self.coefficients(gamma, beta, mean, invstd)
            return (y if write_y else y.new_empty((0,))), z, mean, invstd, scale, shift

        return ops._replace(train_from_z=train_from_z)


def test_f3_hook_gives_the_unit_chain_results(monkeypatch):
    """A backend's train_from_z replaces unit_train for every unit (y written only by the
    last); results equal the unit chain's bitwise, because the coefficients it gets are the
    ones backward rebuilds with."""
    f3 = _F3Backend()
    monkeypatch.setitem(fusedres.backend._REGISTRY, f3.name, f3)
    fused, _ = make_pair("bottleneck-s2-downsample", "torch_ops", dtype=F64)
    hooked = copy.deepcopy(fused)
    hooked.backend = f3.name
    x = make_input("bottleneck-s2-downsample", F64)
    got, grad_fn = run(hooked, x)
    want, _ = run(fused, x)
    assert grad_fn == "_BlockFunctionBackward" and f3.calls == [False, False, True]
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_f3_coefficients_are_computed_once(monkeypatch):
    """The block op takes each unit's coefficients from train_from_z, saves them, and backward
    rebuilds the inner activations with those: it computes none itself (each computation is a
    few kernel launches on a GPU)."""
    f3 = _F3Backend()
    monkeypatch.setitem(fusedres.backend._REGISTRY, f3.name, f3)
    fused, _ = make_pair("bottleneck-s2-downsample", "torch_ops", dtype=F64)
    fused.backend = f3.name
    x = make_input("bottleneck-s2-downsample", F64)
    ours = []
    real = block_op.bn_act_coefficients

    def counted(*args):
        ours.append(args)
        return real(*args)

    monkeypatch.setattr(block_op, "bn_act_coefficients", counted)
    _, grad_fn = run(fused, x)
    assert grad_fn == "_BlockFunctionBackward" and f3.calls == [False, False, True]
    assert ours == []


def test_block_ops_hook_of_each_backend():
    """Backends with unit ops provide the block ops; eager composes nn modules instead."""
    assert get_backend("eager").block_ops() is None
    usable = [n for n in ("cpu", "triton") if get_backend(n).availability()[0]]
    if not usable:
        pytest.skip("neither the cpu nor the triton backend is usable here")
    for name in usable:
        assert isinstance(get_backend(name).block_ops(), BlockOps), name


# -- the C++ block backward -------------------------------------------------------------------

def _freeze(block, frozen):
    """Turns off the gradients ``frozen`` names; returns whether the input takes one."""
    off = {"none": [], "input": [], "conv1": [block.conv1], "unit1": [block.conv1, block.bn1],
           "downsample": [block.downsample] if block.downsample is not None else [],
           "all-but-last-bn": [block]}[frozen]
    for sub in off:
        sub.requires_grad_(False)
    if frozen == "all-but-last-bn":
        last_bn = block.bn3 if isinstance(block, FusedBottleneck) else block.bn2
        last_bn.requires_grad_(True)
    return frozen not in ("input", "all-but-last-bn")


@pytest.mark.parametrize("case,mode", [("basic-s2-downsample", "bn_act"),
                                       ("bottleneck-identity", "bn_act"),
                                       ("bottleneck-s2-downsample", "bn_act"),
                                       ("bottleneck-s2-downsample", "conv1"),
                                       ("resnext-groups", "conv1")])
@pytest.mark.parametrize("frozen", ["none", "input", "conv1", "unit1", "downsample",
                                    "all-but-last-bn"])
def test_block_backward_op_equals_the_python_loop(monkeypatch, case, mode, frozen):
    """The cpu backend's fusedres::block_backward (the block's backward in one C++ call)
    returns bitwise what the block op's Python loop over the same unit ops returns (the loop
    the other backends run, and the op's fake), for each subset of gradients; [0] placeholders
    where none is wanted."""
    if not get_backend("cpu").availability()[0]:
        pytest.skip("the cpu backend is not usable here")
    cpu = type(get_backend("cpu"))
    real_ops = cpu.block_ops
    compared = []

    def checked(*args):
        dx, grads = torch.ops.fusedres.block_backward.default(*args)
        dy, x, y, weights, gammas, betas, zs, means, invstds, geometry, relus, ds, needs = args
        loop_ops = real_ops(get_backend("cpu"))._replace(block_backward=None)
        want_dx, want = block_op.backward_units(loop_ops, dy, x, y, weights, gammas, betas, zs,
                                                means, invstds, block_op.unit_geometry(geometry),
                                                relus, ds, needs)
        assert (want_dx is None) == (not needs[0]) and len(grads) == len(want)
        assert torch.equal(dx, want_dx) if needs[0] else dx.shape == (0,)
        for got, expected in zip(grads, want):
            assert (got.shape == (0,)) if expected is None else torch.equal(got, expected)
        compared.append(needs)
        return dx, grads

    monkeypatch.setattr(cpu, "block_ops",
                        lambda self: real_ops(self)._replace(block_backward=checked))
    fused, _ = make_pair(case, "cpu", recompute=mode)
    x = make_input(case, channels_last=True).requires_grad_(_freeze(fused, frozen))
    y = fused(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
    assert len(compared) == 1 and sum(compared[0]) > 0
