"""The bytes-moved model (fusedres.traffic): hand counts for one unit, shapes against the modules."""

import pytest
import torch
import torch.nn as nn

from fusedres import reference, traffic
from fusedres.traffic import Traffic, Unit

# [2, 4, 8, 8] -> 3x3 stride 1 pad 1 -> [2, 4, 8, 8]: S = X = 512 elements, K = 4*4*9 = 144.
UNIT = Unit("u", n=2, cin=4, h=8, w=8, cout=4, kernel=3, stride=1, padding=1, residual=True)


def test_unit_sizes():
    assert (UNIT.ho, UNIT.wo) == (8, 8)
    assert (UNIT.x_elems, UNIT.out_elems, UNIT.w_elems) == (512, 512, 144)


# Hand counts in elements (see the rules in fusedres/traffic.py), written out term by term.
_CONV_FWD = (512 + 144, 512)                      # read x, w; write z
_CONV_BWD = (512 + 144 + 512 + 512, 512 + 144)    # dgrad: dz, w -> dx; wgrad: x, dz -> dw
HAND = {
    # fwd: conv; stats (z); normalise (z -> t); add (t, res -> s); relu (s -> y)
    # bwd: relu (dy, y -> g); BN (g, z twice -> dz); conv backward
    ("eager", True): (_CONV_FWD[0] + 512 + 512 + 1024 + 512 + 1024 + 2048 + _CONV_BWD[0],
                      _CONV_FWD[1] + 512 * 3 + 512 + 512 + _CONV_BWD[1]),
    # fwd: conv; stats (z); apply (z, res -> y). bwd: pass 1 (dy, y, z -> dres), pass 2 (dres, z -> dz)
    ("cpu", True): (_CONV_FWD[0] + 512 + 1024 + 1536 + 1024 + _CONV_BWD[0],
                    _CONV_FWD[1] + 512 + 512 + 512 + _CONV_BWD[1]),
    # triton: no statistics pass (F1)
    ("triton", True): (_CONV_FWD[0] + 1024 + 1536 + 1024 + _CONV_BWD[0],
                       _CONV_FWD[1] + 512 + 512 + 512 + _CONV_BWD[1]),
    ("eager", False): (_CONV_FWD[0] + 512 + 1024 + 512, _CONV_FWD[1] + 3 * 512),
    ("cpu", False): (_CONV_FWD[0] + 1024, _CONV_FWD[1] + 512),
    # conv with the F2 epilogue: reads x, w, residual; writes y only
    ("triton", False): (512 + 144 + 512, 512),
}


@pytest.mark.parametrize("backend,training", list(HAND))
@pytest.mark.parametrize("itemsize", [4, 2])
def test_unit_hand_counts(backend, training, itemsize):
    r, w = HAND[(backend, training)]
    assert traffic.unit_traffic(UNIT, backend, training, itemsize) == Traffic(r * itemsize,
                                                                              w * itemsize)


def test_cuda_counts_like_cpu():
    # Same fusion points (separate stats pass, F2 pass, two-pass B1), so the same bytes.
    for training in (True, False):
        assert traffic.unit_traffic(UNIT, "cuda", training) == traffic.unit_traffic(
            UNIT, "cpu", training)


def test_downsample_unit_without_relu_or_residual():
    u = Unit("ds", n=1, cin=8, h=4, w=4, cout=16, kernel=1, stride=2, relu=False)
    S, X, K = 16 * 2 * 2, 8 * 4 * 4, 16 * 8
    # eager train: conv, stats, normalise; bwd: BN (dy, z twice -> dz), dgrad, wgrad
    want = Traffic(X + K + S + S + 4 * S + (S + K) + (X + S), S + S + S + X + K)
    assert traffic.unit_traffic(u, "eager", True, 1) == want
    # fused: pass 1 reads dy, z; pass 2 reads dy, z and writes dz
    want = Traffic(X + K + S + S + 2 * S + 2 * S + (S + K) + (X + S), S + S + S + X + K)
    assert traffic.unit_traffic(u, "cpu", True, 1) == want


def test_stem_has_no_dgrad():
    stem = traffic.model_blocks("resnet18", 1, 32)[0][0]
    assert not stem.needs_dx
    with_dx = Unit(**{**stem.__dict__, "needs_dx": True})
    diff = traffic.unit_traffic(with_dx, "eager", True, 1)
    base = traffic.unit_traffic(stem, "eager", True, 1)
    assert (diff.read - base.read, diff.write - base.write) == (
        stem.out_elems + stem.w_elems, stem.x_elems)


def test_block_adds_input_gradient_sum():
    units = traffic.block_units("basic", 2, 64, 64, 8, 8)
    x = 2 * 64 * 8 * 8
    units_only = sum((traffic.unit_traffic(u, "eager", True, 4) for u in units), Traffic(0, 0))
    assert traffic.block_traffic(units, "eager", True, 4) == units_only + Traffic(8 * x, 4 * x)
    assert traffic.block_traffic(units, "eager", False, 4) == sum(
        (traffic.unit_traffic(u, "eager", False, 4) for u in units), Traffic(0, 0))


def _conv_shapes(model: nn.Module, x: torch.Tensor):
    """(in_shape, out_shape, kernel, stride, groups) of every conv, in execution order."""
    seen = []
    hooks = [m.register_forward_hook(
        lambda m, i, o: seen.append((tuple(i[0].shape), tuple(o.shape), m.kernel_size[0],
                                     m.stride[0], m.groups)))
        for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("arch,block,layers", [
    ("resnet18", reference.BasicBlock, [2, 2, 2, 2]),
    ("resnet50", reference.Bottleneck, [3, 4, 6, 3]),
])
def test_model_units_match_the_modules(arch, block, layers):
    model = reference.ResNet(block, layers, num_classes=10)
    convs = _conv_shapes(model, torch.randn(1, 3, 40, 40))
    units = [u for b in traffic.model_blocks(arch, 1, 40) for u in b]
    assert len(units) == len(convs) == {"resnet18": 20, "resnet50": 53}[arch]
    got = sorted(((u.n, u.cin, u.h, u.w), (u.n, u.cout, u.ho, u.wo), u.kernel, u.stride, u.groups)
                 for u in units)
    assert got == sorted(convs)


@pytest.mark.parametrize("arch,gmacs", [("resnet18", 1.8136), ("resnet50", 4.0874)])
def test_model_flops_match_published_macs(arch, gmacs):
    # Published conv MACs at 224x224 (torchvision: 1.81 and 4.09 GMACs, fc included: 0.5/2.0 M).
    fwd = sum(traffic.unit_flops(u, False) for b in traffic.model_blocks(arch, 1, 224) for u in b)
    assert fwd / 2 / 1e9 == pytest.approx(gmacs, rel=2e-3)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_moves_fewer_bytes(arch, training):
    eager = traffic.model_traffic(arch, 8, 224, "eager", training, 2).total
    cpu = traffic.model_traffic(arch, 8, 224, "cpu", training, 2).total
    tri = traffic.model_traffic(arch, 8, 224, "triton", training, 2).total
    assert tri < cpu < eager


# -- F3 and rebuilding inner activations in backward -------------------------------------------

# A Bottleneck conv1-like unit: its y = relu(bn(z)) feeds only the next convolution.
INNER = Unit("inner", n=2, cin=4, h=8, w=8, cout=4, kernel=3, stride=1, padding=1, inner=True)
_S = 512
# triton, training, hand counts in elements: fwd conv; apply (z -> y). bwd: pass 1 (dy, y, z),
# pass 2 (dy, y, z -> dz), conv backward.
_TRITON_INNER = (_CONV_FWD[0] + _S + 3 * _S + 3 * _S + _CONV_BWD[0],
                 _CONV_FWD[1] + _S + _S + _CONV_BWD[1])
INNER_HAND = {
    "triton": _TRITON_INNER,
    # F3: no apply pass; B1 takes the mask from z (pass 1: dy, z; pass 2: dy, z -> dz); a pass
    # rebuilds y (z -> y) for the next convolution's wgrad.
    "triton-f3": (_CONV_FWD[0] + _S + 2 * _S + 2 * _S + _CONV_BWD[0],
                  _CONV_FWD[1] + _S + _S + _CONV_BWD[1]),
    # ... or B1 pass 1 writes y from the z it reads anyway
    "triton-f3-bn": (_CONV_FWD[0] + 2 * _S + 2 * _S + _CONV_BWD[0],
                     _CONV_FWD[1] + _S + _S + _CONV_BWD[1]),
    # ... or the next convolution's wgrad rebuilds it while loading z
    "triton-f3-wgrad": (_CONV_FWD[0] + 2 * _S + 2 * _S + _CONV_BWD[0],
                        _CONV_FWD[1] + _S + _CONV_BWD[1]),
    # cpu: the forward writes y (ATen's conv reads it) but does not keep it: statistics pass,
    # apply; backward as triton-f3's.
    "cpu-recompute": (_CONV_FWD[0] + _S + _S + _S + 2 * _S + 2 * _S + _CONV_BWD[0],
                      _CONV_FWD[1] + _S + _S + _S + _CONV_BWD[1]),
}


@pytest.mark.parametrize("backend", list(INNER_HAND))
def test_inner_unit_hand_counts(backend):
    r, w = INNER_HAND[backend]
    assert traffic.unit_traffic(INNER, backend, True, 2) == Traffic(2 * r, 2 * w)


@pytest.mark.parametrize("backend", ["triton-f3", "triton-f3-bn", "triton-f3-wgrad"])
def test_f3_moves_nothing_in_eval(backend):
    """In eval the conv epilogue already writes y once (F2): F3 would move the same bytes."""
    for unit in (INNER, UNIT):
        assert traffic.unit_traffic(unit, backend, False) == traffic.unit_traffic(
            unit, "triton", False)


@pytest.mark.parametrize("backend", ["triton-f3", "triton-f3-bn", "triton-f3-wgrad",
                                     "cpu-recompute"])
def test_only_inner_units_change(backend):
    """A unit with a residual, or whose y leaves the block, keeps y: its bytes are its base
    backend's."""
    base = "cpu" if backend.startswith("cpu") else "triton"
    not_inner = Unit(**{**INNER.__dict__, "inner": False})
    for unit in (UNIT, not_inner, Unit(**{**UNIT.__dict__, "inner": True})):
        for training in (True, False):
            assert traffic.unit_traffic(unit, backend, training) == traffic.unit_traffic(
                unit, base, training)


def test_block_units_mark_the_inner_units():
    bottleneck = traffic.block_units("bottleneck", 1, 256, 128, 8, 8, stride=2)
    assert [(u.name, u.inner) for u in bottleneck] == [
        ("downsample", False), ("conv1", True), ("conv2", True), ("conv3", False)]
    basic = traffic.block_units("basic", 1, 64, 64, 8, 8)
    assert [(u.name, u.inner) for u in basic] == [("conv1", True), ("conv2", False)]


def test_resnet50_training_saving_depends_on_where_y_is_rebuilt():
    """F3 saves each inner unit's apply pass in forward (read z, write y: 2 S). In backward the
    ReLU mask from z saves the two reads of y, which a separate rebuild pass (2 S) spends again:
    net zero, so triton-f3 saves the forward's 2 S per inner unit and no more; a rebuild in the
    BN backward (writes y only) saves one more S, one in the wgrad prologue two more."""
    args = ("resnet50", 8, 224)
    inner = sum(u.out_elems for b in traffic.model_blocks(*args) for u in b if u.inner)
    base = traffic.model_traffic(*args, "triton", True, 2).total
    for backend, saved in (("triton-f3", 2), ("triton-f3-bn", 3), ("triton-f3-wgrad", 4)):
        assert base - traffic.model_traffic(*args, backend, True, 2).total == saved * inner * 2
    # cpu keeps writing y in forward; the rebuild pass trades the two reads of y for one of z
    # and one write of y: not keeping y costs no bytes.
    assert traffic.model_traffic(*args, "cpu-recompute", True, 2).total == traffic.model_traffic(
        *args, "cpu", True, 2).total
    ratios = traffic.ratios_to_eager(*args)
    assert ratios["triton-f3-wgrad"][0] < ratios["triton-f3-bn"][0] < ratios["triton-f3"][0] \
        < ratios["triton"][0] < ratios["cpu"][0] < 1.0
    assert ratios["triton-f3"][1] == ratios["triton"][1]


def test_inconsistent_fusions_are_rejected(monkeypatch):
    F = traffic.Fusion
    for bad in (F(True, True, True, True, prologue=True),             # F3 without a rebuild
                F(True, True, True, False, rebuild="pass"),           # rebuild without B1
                F(False, True, False, True, rebuild="wgrad"),         # wgrad rebuild, no F3
                F(True, True, True, True, prologue=True, rebuild="later")):
        monkeypatch.setitem(traffic.FUSIONS, "bad", bad)
        with pytest.raises(ValueError, match="inconsistent"):
            traffic.unit_traffic(INNER, "bad", True)


def test_main_prints_every_backend(capsys):
    assert traffic.main(["--batch", "2", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{backend} " in out for backend in traffic.FUSIONS)
