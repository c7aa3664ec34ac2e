"""The GPU backends (triton, and cuda: csrc/cuda through torch.ops.fusedres) at ResNet shapes.

The interpreter tests prove the structure at tiny shapes; these prove the compiled kernels, every
config of every Triton kernel, the autotuner and the int32/int64 index arithmetic at real sizes,
against the fp64 oracle. Units (ResNet-50 / ResNeXt-50, ReLU on and off) and whole blocks
(ResNet-50 bottlenecks, ResNet-18 basic blocks, channels_last) run on both backends, the same
matrix; a backend that is unusable here is skipped with its reason. fp32 convolutions run without
TF32 on both sides (tests/kernels/conftest.py).

Runtime: the whole CUDA test stage of scripts/gpu_validate.sh has ~150 s on an H100, so the block
matrix runs at batch 16 (the row count N*H*W of every stage stays a multiple of 16, as at batch
32, and Triton specialises its kernels on that: fewer new compiles), and the int64 tests check
the images around and past element 2^31 rather than whole tensors.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedres
from conftest import assert_oracle_close
from fusedres import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU, reference

from .test_triton_backend import _compare, _downsample, _randomize_bn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (N, Cin, H, W, Cout, kernel, stride, groups): every distinct unit geometry of ResNet-50 at
# batch 32 (stem through layer4) and ResNeXt-50 32x4d's narrow grouped 3x3.
RESNET50_UNITS = {
    "stem-7x7s2": (32, 3, 224, 224, 64, 7, 2, 1),
    "l1-1x1-reduce": (32, 64, 56, 56, 64, 1, 1, 1),
    "l1-3x3": (32, 64, 56, 56, 64, 3, 1, 1),
    "l1-1x1-expand": (32, 64, 56, 56, 256, 1, 1, 1),
    "l2-3x3s2": (32, 128, 56, 56, 128, 3, 2, 1),
    "l2-downsample-1x1s2": (32, 256, 56, 56, 512, 1, 2, 1),
    "l3-3x3": (32, 256, 14, 14, 256, 3, 1, 1),
    "l4-1x1-expand": (32, 512, 7, 7, 2048, 1, 1, 1),
    "resnext-l1-3x3-g32": (32, 128, 56, 56, 128, 3, 1, 32),
}


def _gpu_backends():
    """pytest params "triton" and "cuda", each skipped with its reason where it is unusable."""
    params = []
    for name, (ok, why) in fusedres.available_backends().items():
        if name in ("triton", "cuda"):
            marks = () if ok else pytest.mark.skip(reason=f"backend {name!r} is unusable: {why}")
            params.append(pytest.param(name, marks=marks))
    return params


GPU_BACKENDS = _gpu_backends()


def _unit_case(name, dtype, has_residual=True, training=True, device="cuda", backend="triton",
               relu=True):
    """Runs RESNET50_UNITS[name] on ``backend`` and checks it against the oracle."""
    n, cin, h, w, cout, k, stride, groups = RESNET50_UNITS[name]
    eager = reference.ConvBNAct(cin, cout, k, stride, groups=groups, relu=relu)
    _randomize_bn(eager.bn)
    eager = eager.to(device, dtype)
    fused = FusedConvBNReLU(cin, cout, k, stride, groups=groups, relu=relu, backend=backend)
    fused.to(device, dtype).load_state_dict(eager.state_dict())
    x = torch.randn(n, cin, h, w, device=device).to(memory_format=torch.channels_last)
    ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    res = torch.randn(n, cout, ho, wo, device=device) if has_residual else None
    return _compare(fused, eager, x, res, dtype, training)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("unit", RESNET50_UNITS)
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_resnet50_unit(dtype, unit, has_residual, training, backend):
    got = _unit_case(unit, dtype, has_residual, training, backend=backend)
    assert got["y"].is_contiguous(memory_format=torch.channels_last)


# (unit, has_residual) without ReLU: the downsample unit as ResNet has it, and a 3x3 with a
# residual (no ResNet unit adds without ReLU, but the flags are independent).
RELU_OFF_UNITS = [("l2-downsample-1x1s2", False), ("l3-3x3", True)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("unit,has_residual", RELU_OFF_UNITS,
                         ids=[f"{u}-{'res' if r else 'nores'}" for u, r in RELU_OFF_UNITS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_resnet50_unit_without_relu(dtype, unit, has_residual, training, backend):
    got = _unit_case(unit, dtype, has_residual, training, backend=backend, relu=False)
    assert got["y"].is_contiguous(memory_format=torch.channels_last)


# (fused class, eager class, inplanes, planes, stride, H): the first block of each ResNet-50
# stage (with its downsample: 1x1 at stride 1 in layer1, 1x1/2 after), an identity bottleneck,
# and ResNet-18's basic blocks (identity in layer1, downsampling after).
RESNET_BLOCKS = {
    "r50-layer1.0": (FusedBottleneck, reference.Bottleneck, 64, 64, 1, 56),
    "r50-layer2.0": (FusedBottleneck, reference.Bottleneck, 256, 128, 2, 56),
    "r50-layer3.0": (FusedBottleneck, reference.Bottleneck, 512, 256, 2, 28),
    "r50-layer3.1": (FusedBottleneck, reference.Bottleneck, 1024, 256, 1, 14),
    "r50-layer4.0": (FusedBottleneck, reference.Bottleneck, 1024, 512, 2, 14),
    "r18-layer1.0": (FusedBasicBlock, reference.BasicBlock, 64, 64, 1, 56),
    "r18-layer2.0": (FusedBasicBlock, reference.BasicBlock, 64, 128, 2, 56),
    "r18-layer4.0": (FusedBasicBlock, reference.BasicBlock, 256, 512, 2, 14),
}
BLOCK_BATCH = 16


def _block_case(name, dtype, backend, device="cuda", batch=BLOCK_BATCH):
    """RESNET_BLOCKS[name] in training, forward + backward, model and input channels_last, on
    ``backend`` against the oracle.

    Gradients are compared by relative L2 error: a block has two inner ReLUs, and at these
    sizes some pre-activations round to the other side of 0 in fp16/bf16, in eager and fused
    runs alike, each moving single gradient entries by O(1) (conftest.assert_oracle_close).
    """
    fused_cls, eager_cls, inplanes, planes, stride, h = RESNET_BLOCKS[name]
    out = planes * eager_cls.expansion
    ds = _downsample(inplanes, out, stride) if (stride != 1 or inplanes != out) else None
    eager = eager_cls(inplanes, planes, stride, copy.deepcopy(ds))
    for mod in eager.modules():
        if isinstance(mod, nn.BatchNorm2d):
            _randomize_bn(mod)
    eager = eager.to(device, dtype).to(memory_format=torch.channels_last)
    fused = fused_cls(inplanes, planes, stride, copy.deepcopy(ds), backend=backend)
    fused = fused.to(device, dtype).to(memory_format=torch.channels_last)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(batch, inplanes, h, h, device=device).to(memory_format=torch.channels_last)
    got = _compare(fused, eager, x, None, dtype, training=True, grad_norm="rel_l2")
    assert got["y"].shape == (batch, out, h // stride, h // stride)
    assert got["y"].is_contiguous(memory_format=torch.channels_last)
    return got


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block", RESNET_BLOCKS)
def test_resnet_block(block, dtype, backend):
    _block_case(block, dtype, backend)


def _free_gpu_memory_or_skip(gib: int) -> None:
    # Blocks cached by earlier tests count as used in mem_get_info: hand them back first.
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


def test_int64_offsets_beyond_2_pow_31():
    """A tensor of more than 2^31 elements through the BN kernels (~4.3 GB in fp16)."""
    from fusedres.kernels import bn
    _free_gpu_memory_or_skip(24)
    z = torch.randn(2**31 // (64 * 56 * 56) + 1, 64, 56, 56, device="cuda",
                    dtype=torch.float16).to(memory_format=torch.channels_last)
    assert z.numel() > 2**31
    mean, var = bn.bn_stats(z)
    ref_var, ref_mean = torch.var_mean(z.float(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, ref_mean, atol=1e-3, rtol=0)
    torch.testing.assert_close(var, ref_var, atol=1e-3, rtol=1e-3)
    scale = torch.ones(64, device="cuda")
    y = bn.bn_act_fwd(z, scale, torch.zeros(64, device="cuda"), None, relu=True)
    assert torch.equal(y[-1], torch.relu(z[-1]))


# [N, 64, 56, 56] (ResNet-50's layer1) at N = 12000: 2.41e9 elements, 4.8 GB in fp16. Image 10699
# straddles element 2^31; the last 1300 images lie past it.
BIG_N, BIG_C, BIG_HW = 12000, 64, 56
STRADDLING = 2**31 // (BIG_C * BIG_HW * BIG_HW)
#: images checked element by element: the straddling one and its neighbour, and the last two.
CHECKED_IMAGES = (slice(STRADDLING, STRADDLING + 2), slice(BIG_N - 2, BIG_N))


def _big_activation() -> torch.Tensor:
    """A fresh [BIG_N, BIG_C, BIG_HW, BIG_HW] fp16 channels_last tensor, filled in place (no
    second 4.8 GB copy for the layout change)."""
    shape = (BIG_N, BIG_C, BIG_HW, BIG_HW)
    t = torch.empty(shape, device="cuda", dtype=torch.float16, memory_format=torch.channels_last)
    assert t.numel() > 2**31
    return t


def _chunked_sums(fn, chunk: int = 1000) -> torch.Tensor:
    """sum over images of ``fn(images)`` ([n, C, H, W] float64 -> per channel [C]), in chunks of
    ``chunk`` images, so that the float64 temporaries stay ~2 GB."""
    return sum(fn(slice(i, min(i + chunk, BIG_N))).sum((0, 2, 3)) for i in range(0, BIG_N, chunk))


def test_int64_offsets_conv_beyond_2_pow_31():
    """The conv kernel with an input and an output of more than 2^31 elements: the tap path
    (3x3 with the statistics epilogue) and the plain GEMM path (1x1 with the eval epilogue and a
    residual of that size), on the images around and past element 2^31, and the statistics of
    the whole output, against float64 (peak ~20 GB)."""
    from fusedres.kernels import bn, conv
    _free_gpu_memory_or_skip(32)
    x = _big_activation().normal_()
    c, m = BIG_C, BIG_N * BIG_HW * BIG_HW
    w3 = torch.randn(c, c, 3, 3, device="cuda", dtype=torch.float64) / (9 * c) ** 0.5
    z, pmean, pm2, rows = conv.conv2d(x, w3.half(), (1, 1), (1, 1), (1, 1), 1, stats=True)
    for images in CHECKED_IMAGES:
        exact = F.conv2d(x[images].double(), w3, None, 1, 1)
        eager = F.conv2d(x[images], w3.half(), None, 1, 1)
        assert_oracle_close(z[images], eager, exact, f"z[{images.start}:{images.stop}]")
    mean, var = bn.stats_from_partials(pmean, pm2, m, rows)
    exact_mean = _chunked_sums(lambda i: z[i].double()) / m
    exact_var = _chunked_sums(lambda i: (z[i].double() - exact_mean.view(1, c, 1, 1)) ** 2) / m
    torch.testing.assert_close(mean.double(), exact_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(var.double(), exact_var, rtol=1e-4, atol=0)
    z = pmean = pm2 = None  # 4.8 GB back before the next output

    w1 = torch.randn(c, c, 1, 1, device="cuda", dtype=torch.float64) / c ** 0.5
    scale = torch.empty(c, device="cuda").uniform_(0.5, 1.5)
    shift = torch.empty(c, device="cuda").uniform_(-0.5, 0.5)
    y = conv.conv2d(x, w1.half(), (1, 1), (0, 0), (1, 1), 1, scale=scale, shift=shift,
                    residual=x, relu=True)
    for images in CHECKED_IMAGES:
        xi = x[images]
        exact = reference.bn_act_fwd(F.conv2d(xi.double(), w1), scale, shift, xi, True)
        eager = reference.bn_act_fwd(F.conv2d(xi, w1.half()), scale, shift, xi, True,
                                     upcast=False)
        assert_oracle_close(y[images], eager, exact, f"y[{images.start}:{images.stop}]")


def test_int64_offsets_bn_backward_beyond_2_pow_31():
    """The BN backward kernels in training (pass 1: ReLU mask, dresidual, per-channel sums;
    pass 2: dz) on tensors of more than 2^31 elements (five of them, 24 GB).

    dy = 1 makes g the ReLU mask, so dbias counts the positive y and, with mean 0, dweight sums
    positive terms: no cancellation, so float32 sums match float64 closely. The images past
    2^31 are shifted by +1: rows read from a wrapped offset (the start of the buffer) would
    change both sums by several percent.
    """
    from fusedres.kernels import bn
    _free_gpu_memory_or_skip(40)
    c, m = BIG_C, BIG_N * BIG_HW * BIG_HW
    z = _big_activation().normal_()
    z[STRADDLING + 1:] += 1.0
    y = torch.relu(z)
    dy = _big_activation().fill_(1.0)
    mean = torch.zeros(c, device="cuda")
    invstd = torch.empty(c, device="cuda").uniform_(0.5, 2.0)
    gamma = torch.empty(c, device="cuda").uniform_(0.5, 1.5)
    dz, dweight, dbias, dres = bn.bn_act_bwd(dy, y, z, mean, invstd, gamma, relu=True,
                                             has_residual=True, training=True)

    exact_dbias = _chunked_sums(lambda i: (y[i] > 0).double())
    exact_dweight = _chunked_sums(lambda i: (y[i] > 0) * z[i].double()) * invstd.double()
    torch.testing.assert_close(dbias.double(), exact_dbias, rtol=1e-4, atol=0)
    torch.testing.assert_close(dweight.double(), exact_dweight, rtol=1e-4, atol=0)
    per_channel = (lambda v: v.view(1, c, 1, 1))
    for images in CHECKED_IMAGES:
        g = (y[images] > 0).half()
        assert torch.equal(dres[images], g), f"dresidual[{images.start}:{images.stop}]"
        outputs = []
        for dt, sums in ((torch.float64, (exact_dbias, exact_dweight)),
                         (torch.float32, (exact_dbias.float(), exact_dweight.float()))):
            # dz = gamma*invstd*(g - dbias/M - xhat*dweight/M), xhat = (z - mean)*invstd.
            coef, inv = per_channel((gamma * invstd).to(dt)), per_channel(invstd.to(dt))
            xhat = z[images].to(dt) * inv
            outputs.append(coef * (g.to(dt) - per_channel(sums[0].to(dt)) / m
                                   - xhat * per_channel(sums[1].to(dt)) / m))
        exact, eager = outputs[0], outputs[1].half()
        assert_oracle_close(dz[images], eager, exact, f"dz[{images.start}:{images.stop}]")


def _most_configs() -> int:
    from fusedres.kernels import bn, conv
    from fusedres.kernels._launch import arch_configs, device_arch
    arch = device_arch(torch.device("cuda"))
    tables = (conv.CONV_CONFIGS, conv.CONV_FLAT_CONFIGS, bn.ELEMENTWISE_CONFIGS)
    return max(len(arch_configs(t, arch)) for t in tables)


@pytest.mark.parametrize("unit", ["l1-3x3", "l2-downsample-1x1s2", "stem-7x7s2",
                                  "resnext-l1-3x3-g32"])
def test_every_config(monkeypatch, unit):
    """The matrix above runs each kernel's first config; production may autotune to any."""
    for index in range(_most_configs()):
        monkeypatch.setenv("FUSEDRES_TRITON_CONFIG", str(index))
        for training in (True, False):
            _unit_case(unit, torch.bfloat16, training=training)


@pytest.mark.parametrize("unit", ["l1-1x1-expand", "l3-3x3"])
def test_autotuned(monkeypatch, tmp_path, unit):
    """What users run: the autotuner picks the config (timing every one on first use; an empty
    cache directory, so that configs persisted by an earlier run do not stand in for tuning)."""
    monkeypatch.delenv("FUSEDRES_TRITON_CONFIG", raising=False)
    monkeypatch.setenv("FUSEDRES_AUTOTUNE_CACHE_DIR", str(tmp_path))
    for training in (True, False):
        _unit_case(unit, torch.bfloat16, training=training)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_second_device():
    """Triton launches on the current device; the launchers switch to the tensors' device."""
    assert torch.cuda.current_device() == 0
    _unit_case("l3-3x3", torch.float16, device="cuda:1")
