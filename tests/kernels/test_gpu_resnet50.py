"""The triton backend on a GPU at ResNet-50 / ResNeXt-50 shapes, fp16, bf16 and fp32.

The interpreter tests prove the structure at tiny shapes; these prove the compiled kernels, every
config of every kernel, the autotuner and the int32/int64 index arithmetic at real sizes, against
the fp64 oracle. fp32 convolutions run without TF32 on both sides (tests/kernels/conftest.py).
"""

import pytest
import torch

from fusedres import FusedConvBNReLU, reference

from .test_triton_backend import _compare, _randomize_bn

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


def _unit_case(name, dtype, has_residual=True, training=True, device="cuda"):
    """Runs RESNET50_UNITS[name] through the triton backend and checks it against the oracle."""
    n, cin, h, w, cout, k, stride, groups = RESNET50_UNITS[name]
    eager = reference.ConvBNAct(cin, cout, k, stride, groups=groups, relu=True)
    _randomize_bn(eager.bn)
    eager = eager.to(device, dtype)
    fused = FusedConvBNReLU(cin, cout, k, stride, groups=groups, relu=True, backend="triton")
    fused.to(device, dtype).load_state_dict(eager.state_dict())
    x = torch.randn(n, cin, h, w, device=device).to(memory_format=torch.channels_last)
    ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    res = torch.randn(n, cout, ho, wo, device=device) if has_residual else None
    return _compare(fused, eager, x, res, dtype, training)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("unit", RESNET50_UNITS)
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_resnet50_unit(dtype, unit, has_residual, training):
    got = _unit_case(unit, dtype, has_residual, training)
    assert got["y"].is_contiguous(memory_format=torch.channels_last)


def test_int64_offsets_beyond_2_pow_31():
    """A tensor of more than 2^31 elements through the BN kernels (~4.3 GB in fp16)."""
    from fusedres.kernels import bn
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
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
def test_autotuned(monkeypatch, unit):
    """What users run: the autotuner picks the config (timing every one on first use)."""
    monkeypatch.delenv("FUSEDRES_TRITON_CONFIG", raising=False)
    for training in (True, False):
        _unit_case(unit, torch.bfloat16, training=training)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_second_device():
    """Triton launches on the current device; the launchers switch to the tensors' device."""
    assert torch.cuda.current_device() == 0
    _unit_case("l3-3x3", torch.float16, device="cuda:1")
