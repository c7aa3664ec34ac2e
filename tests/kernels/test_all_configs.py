"""Every sm_80 and sm_90 config of the convolution and BatchNorm kernels, against the oracle.

The other kernel tests run, on the CPU, one small interpreter config per kernel; on a GPU the
autotuner may pick any config of the arch's table, and its tile sizes (BLOCK_M 128, BLOCK_K 64,
...) decide the masks, the walk over k and the statistics partials. ``FUSEDRES_INTERPRET_ARCH``
makes the launchers run those configs in the interpreter (on a GPU, only the GPU's own arch can
run). Each config runs once, at a small shape that still spans more than one tile along M, the
output channels and k, for every path of the convolution and every dtype the device tests.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_oracle_close
from fusedres import reference

from .conftest import DEVICE, DTYPES

ARCHS = (80, 90)
#: The arch whose every config runs under the interpreter. The interpreter runs a config's tile
#: sizes and ignores num_warps and num_stages, so there the other arch runs only the configs
#: whose tile sizes this arch's table lacks (on a GPU every config of its own arch runs).
EVERY_CONFIG_ARCH = 90

# (N, Cin, H, W, Cout, kernel, stride, padding): one convolution per path of the kernel, each
# spanning more than one tile: M = N*Ho*Wo = 162 rows (BLOCK_M is 64 or 128), 72 output channels
# (BLOCK_N 16, 64 or 128: a masked tail), and k over several BLOCK_K slices (the tap-by-tap cases
# walk 9 taps of 64 channels, two slices each at BLOCK_K = 32).
CONV_PATHS = {
    "taps-3x3": (2, 64, 9, 9, 72, 3, 1, 1),
    "pointwise-1x1": (2, 128, 9, 9, 72, 1, 1, 0),
    "flat-stem-7x7s2": (2, 3, 17, 17, 72, 7, 2, 3),
    "flat-pointwise-1x1": (2, 24, 9, 9, 72, 1, 1, 0),
}

# (dtype, dot precision): each picks its own config tables. float32 runs with TF32 and without
# ("ieee"); on a GPU without only, as the other GPU tests do: TF32's rounding would need an eager
# reference that rounds alike (see tests/kernels/conftest.py).
OPERANDS = [(dtype, "tf32") for dtype in DTYPES if dtype != torch.float32 or DEVICE == "cpu"]
OPERANDS.append((torch.float32, "ieee"))


def _modules():
    from fusedres.kernels import _launch, bn, conv  # after conftest has set TRITON_INTERPRET
    return _launch, bn, conv


def _tiles(config) -> tuple:
    """What the interpreter runs of a config: its meta-parameters (tile sizes)."""
    return tuple(sorted(config.kwargs.items()))


def _each_config(monkeypatch, arch: int, module, run) -> None:
    """Calls ``run()`` once per config of the table ``module``'s launches use.

    Checks on every launch that the config that ran is the one asked for, from ``arch``'s table.
    Under the interpreter, an index after the first whose configs' tile sizes all run in
    ``EVERY_CONFIG_ARCH``'s test of the same tables is skipped: it would repeat that run.
    """
    _launch, _, _ = _modules()
    if DEVICE == "cuda" and _launch.device_arch(torch.device("cuda")) != arch:
        pytest.skip(f"the GPU here runs its own arch's configs, not sm_{arch}'s")
    monkeypatch.setenv("FUSEDRES_INTERPRET_ARCH", str(arch))
    launched = []
    real_launch = module.launch

    def recording_launch(kernel, grid, args, *, table, **options):
        config = real_launch(kernel, grid, args, table=table, **options)
        launched.append((table, config))
        return config

    monkeypatch.setattr(module, "launch", recording_launch)
    index, count, tables = 0, 1, []

    def repeats_every_config_arch(index: int) -> bool:
        if DEVICE != "cpu" or arch == EVERY_CONFIG_ARCH:
            return False
        for table in tables:
            configs = _launch.arch_configs(table, arch)
            tiles_run = {_tiles(c) for c in _launch.arch_configs(table, EVERY_CONFIG_ARCH)}
            if _tiles(configs[min(index, len(configs) - 1)]) not in tiles_run:
                return False
        return True

    while index < count:
        if index > 0 and repeats_every_config_arch(index):
            index += 1
            continue
        monkeypatch.setenv("FUSEDRES_TRITON_CONFIG", str(index))
        launched.clear()
        run()
        assert launched, "the launcher launched nothing through fusedres.kernels._launch.launch"
        for table, config in launched:
            configs = _launch.arch_configs(table, arch)
            assert config is configs[min(index, len(configs) - 1)], \
                f"config {index} of sm_{arch}'s table did not run"
            count = max(count, len(configs))
            if all(table is not seen for seen in tables):
                tables.append(table)
        index += 1


def _eager_conv(x, w, stride, pad):
    if x.device.type == "cpu" and x.dtype == torch.float16:
        # CPU fp16 convolution accumulates in fp32 and rounds once, like a GPU's: emulate it.
        return F.conv2d(x.float(), w.float(), None, stride, pad).to(x.dtype)
    return F.conv2d(x, w, None, stride, pad)


@pytest.mark.parametrize("dtype,precision", OPERANDS, ids=[f"{d}-{p}" for d, p in OPERANDS])
@pytest.mark.parametrize("path", CONV_PATHS.values(), ids=CONV_PATHS.keys())
@pytest.mark.parametrize("arch", ARCHS)
def test_conv_every_config(monkeypatch, arch, path, dtype, precision):
    """F1 (z and its statistics) and F2 in eval (scale, shift, residual, ReLU), each config."""
    _, bn, conv = _modules()
    # The launcher picks the ieee tables when TF32 is off for cuDNN convolutions.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", precision == "tf32")
    n, cin, h, w, cout, k, stride, pad = path
    x = torch.randn(n, cin, h, w, dtype=torch.float64).to(dtype).to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k * k) ** 0.5)
    weight = weight.to(dtype).to(DEVICE).contiguous(memory_format=torch.channels_last)
    geometry = ((stride, stride), (pad, pad), (1, 1), 1)
    z_exact = F.conv2d(x.double(), weight.double(), None, stride, pad)
    z_eager = _eager_conv(x, weight, stride, pad)
    scale = torch.empty(cout).uniform_(0.5, 1.5).to(DEVICE)
    shift = torch.empty(cout).uniform_(-0.5, 0.5).to(DEVICE)
    residual = torch.randn(z_exact.shape).to(dtype).to(DEVICE)
    y_exact = reference.bn_act_fwd(z_exact, scale, shift, residual, True)
    y_eager = reference.bn_act_fwd(z_eager, scale, shift, residual, True, upcast=False)

    def run():
        z, pmean, pm2, rows = conv.conv2d(x, weight, *geometry, stats=True)
        assert_oracle_close(z.cpu(), z_eager.cpu(), z_exact.cpu(), name="z")
        mean, var = bn.stats_from_partials(pmean, pm2, z.numel() // cout, rows)
        ex_mean, ex_var = reference.bn_stats(z, upcast=True)
        eager_mean, eager_var = reference.bn_stats(z, upcast=False)
        assert_oracle_close(mean.cpu(), eager_mean.cpu(), ex_mean.cpu(), "mean", atol=1e-6)
        assert_oracle_close(var.cpu(), eager_var.cpu(), ex_var.cpu(), "var", atol=1e-6)
        y = conv.conv2d(x, weight, *geometry, scale=scale, shift=shift, residual=residual,
                        relu=True)
        assert_oracle_close(y.cpu(), y_eager.cpu(), y_exact.cpu(), name="y")

    _each_config(monkeypatch, arch, conv, run)


@pytest.mark.parametrize("dtype,precision", OPERANDS, ids=[f"{d}-{p}" for d, p in OPERANDS])
@pytest.mark.parametrize("path", CONV_PATHS.values(), ids=CONV_PATHS.keys())
@pytest.mark.parametrize("arch", ARCHS)
def test_conv_prologue_every_config(monkeypatch, arch, path, dtype, precision):
    """F3 (x is the previous unit's z; its BN + ReLU is applied while loading x) with the
    training epilogue (z and its statistics), each config of the prologue's tables."""
    _, bn, conv = _modules()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", precision == "tf32")
    n, cin, h, w, cout, k, stride, pad = path
    x = torch.randn(n, cin, h, w, dtype=torch.float64).to(dtype).to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k * k) ** 0.5)
    weight = weight.to(dtype).to(DEVICE).contiguous(memory_format=torch.channels_last)
    geometry = ((stride, stride), (pad, pad), (1, 1), 1)
    # Mostly positive shifts: a padding tap that took the prologue (relu(shift) instead of the
    # zero of y) would show.
    in_scale = torch.empty(cin).uniform_(0.5, 1.5).to(DEVICE)
    in_shift = torch.empty(cin).uniform_(-0.3, 1.0).to(DEVICE)
    y_exact = reference.bn_act_fwd(x.double(), in_scale, in_shift, None, True)
    z_exact = F.conv2d(y_exact, weight.double(), None, stride, pad)
    y_eager = reference.bn_act_fwd(x, in_scale, in_shift, None, True, upcast=False)
    z_eager = _eager_conv(y_eager, weight, stride, pad)

    def run():
        z, pmean, pm2, rows = conv.conv2d(x, weight, *geometry, stats=True, in_scale=in_scale,
                                          in_shift=in_shift)
        assert_oracle_close(z.cpu(), z_eager.cpu(), z_exact.cpu(), name="z")
        mean, var = bn.stats_from_partials(pmean, pm2, z.numel() // cout, rows)
        ex_mean, ex_var = reference.bn_stats(z, upcast=True)
        eager_mean, eager_var = reference.bn_stats(z, upcast=False)
        assert_oracle_close(mean.cpu(), eager_mean.cpu(), ex_mean.cpu(), "mean", atol=1e-6)
        assert_oracle_close(var.cpu(), eager_var.cpu(), ex_var.cpu(), "var", atol=1e-6)

    _each_config(monkeypatch, arch, conv, run)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_batchnorm_every_config(monkeypatch, arch, dtype):
    """Statistics, forward and the two-pass backward with the reduction and finalize configs
    of ``arch`` and each of its elementwise configs."""
    _launch, bn, _ = _modules()
    # M = 1250 rows: two reduction programs of the interpreter's 1024 rows; C = 72: two channel
    # tiles of 64, one of 128 with a masked tail.
    z = (torch.randn(2, 72, 25, 25, dtype=torch.float64) + 3).to(dtype).to(DEVICE)
    z = z.contiguous(memory_format=torch.channels_last)
    residual = torch.randn(z.shape, dtype=torch.float64).to(dtype).to(DEVICE)
    dy = torch.randn(z.shape, dtype=torch.float64).to(dtype).to(DEVICE)
    gamma = torch.empty(72).uniform_(0.5, 1.5).to(DEVICE)
    beta = torch.empty(72).uniform_(-0.5, 0.5).to(DEVICE)
    ex_mean, ex_var = reference.bn_stats(z, upcast=True)
    eager_mean, eager_var = reference.bn_stats(z, upcast=False)
    invstd = torch.rsqrt(ex_var.float() + 1e-5)
    scale, shift = gamma * invstd, beta - ex_mean.float() * gamma * invstd
    y_exact = reference.bn_act_fwd(z.double(), scale, shift, residual, True)
    y_eager = reference.bn_act_fwd(z, scale, shift, residual, True, upcast=False)

    def run():
        mean, var = bn.bn_stats(z)
        assert_oracle_close(mean.cpu(), eager_mean.cpu(), ex_mean.cpu(), "mean", atol=1e-6)
        assert_oracle_close(var.cpu(), eager_var.cpu(), ex_var.cpu(), "var", atol=1e-6)
        y = bn.bn_act_fwd(z, scale, shift, residual, relu=True)
        assert_oracle_close(y.cpu(), y_eager.cpu(), y_exact.cpu(), name="y")
        grads = bn.bn_act_bwd(dy, y, z, ex_mean.float(), invstd, gamma, relu=True,
                              has_residual=True, training=True)
        exact = reference.bn_act_bwd(dy.double(), y.double(), z.double(), ex_mean, invstd,
                                     gamma, True, True, True)
        eager = reference.bn_act_bwd(dy, y, z, ex_mean.float(), invstd, gamma, True, True, True,
                                     upcast=False)
        for name, got, want_eager, want in zip(("dz", "dweight", "dbias", "dresidual"), grads,
                                               eager, exact):
            assert_oracle_close(got.cpu(), want_eager.cpu(), want.cpu(), name=name)

    _each_config(monkeypatch, arch, bn, run)
    # The reductions are not autotuned: they launched the arch's one config, not the
    # interpreter's.
    assert bn._reduce_config(z.device) is _launch.arch_configs(bn.REDUCE_CONFIGS, arch)[0]
    assert bn._finalize_config(z.device) is _launch.arch_configs(bn.FINALIZE_CONFIGS, arch)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_statistics_finalize_two_levels(monkeypatch, arch):
    """More partials than one finalize program merges (the stem's conv leaves thousands): the
    chunked first level, with the arch's finalize config."""
    _launch, bn, _ = _modules()
    config = _launch.arch_configs(bn.FINALIZE_CONFIGS, arch)[0]
    monkeypatch.setattr(bn, "_finalize_config", lambda device: config)
    rows, channels = 3, 40
    partials = bn._FINALIZE_TILES_PER_PROGRAM * config.kwargs["BLOCK_P"] + 77
    z = torch.randn(partials * rows, channels, dtype=torch.float64) * 2 + 5
    tiles = z.view(partials, rows, channels)
    pmean = tiles.mean(1)
    pm2 = ((tiles - pmean[:, None]) ** 2).sum(1)
    mean, var = bn.stats_from_partials(pmean.float().to(DEVICE), pm2.float().to(DEVICE),
                                       z.shape[0], rows)
    eager = z.float()
    assert_oracle_close(mean.cpu(), eager.mean(0), z.mean(0), "mean", atol=1e-6)
    assert_oracle_close(var.cpu(), eager.var(0, unbiased=False), z.var(0, unbiased=False), "var",
                        atol=1e-6)
