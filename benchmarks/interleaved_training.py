"""Training step of a fused ResNet against eager and torch.compile, with and without the cpu
backend's GEMM convolutions, interleaved round by round.

Providers, each one training step (forward under CPU autocast for ``--dtype bfloat16``,
cross-entropy, backward, SGD with momentum) per round, in an order rotated from round to round,
every model and input in channels_last:

- ``eager_cl``: eager PyTorch (torchvision's ResNet code).
- ``compile``: torch.compile of eager (default inductor).
- ``fused``: the ``cpu`` backend as a user runs it (block-level op; convolutions through the GEMM
  path where it applies, csrc/cpu/gemm_conv.h).
- ``fused_onednn_conv``: the same with the GEMM path off: every convolution through ATen/oneDNN,
  as eager's.

All start from the same weights on the same batch; each provider's first loss is checked
against eager's before timing. It prints each one's median, interquartile range and the median
over rounds of eager_cl's (and compile's) time divided by its time in the same round, with a
95% confidence interval.

    python benchmarks/interleaved_training.py --arch resnet50,resnet18 --batch 8 --size 112
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

import fusedres
from fusedres._ext import _C
from interleaved_inference import _autocast, build_model, run_cli, summarize, time_rounds


def _step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, dtype: torch.dtype,
          gemm_conv: bool):
    """One SGD step of ``model`` per call, the cpu GEMM path set to ``gemm_conv`` while it runs;
    returns the loss."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> torch.Tensor:
        before = _C.cpu_gemm_conv()
        _C.set_cpu_gemm_conv(gemm_conv)
        try:
            with _autocast(dtype):
                loss = F.cross_entropy(model(x).float(), target)
            loss.backward()
        finally:
            _C.set_cpu_gemm_conv(before)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _providers(arch: str, batch: int, size: int, dtype: torch.dtype, with_compile: bool,
               dilated: bool):
    torch.manual_seed(0)
    base = build_model(arch, dilated).train()
    base = base.to(memory_format=torch.channels_last)
    eager = fusedres.to_eager(copy.deepcopy(base))
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,))
    models = {"eager_cl": (eager, True)}
    if with_compile:
        models["compile"] = (torch.compile(copy.deepcopy(eager), dynamic=False), True)
    models.update({"fused": (base, True), "fused_onednn_conv": (copy.deepcopy(base), False)})
    return {name: _step(m, x, target, dtype, gemm) for name, (m, gemm) in models.items()}


def measure(arch: str, batch: int, size: int, dtype: torch.dtype, rounds: int, warmup: int,
            with_compile: bool, dilated: bool = False) -> dict:
    providers = _providers(arch, batch, size, dtype, with_compile, dilated)
    # The first step of each runs the same weights on the same batch: the losses must agree.
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    losses = {name: step().item() for name, step in providers.items()}
    for name, loss in losses.items():
        if not math.isclose(loss, losses["eager_cl"], rel_tol=tolerance):
            raise AssertionError(f"{name}: first loss {loss} differs from eager's "
                                 f"{losses['eager_cl']} by more than {tolerance:.0e}")
    for _ in range(warmup - 1):  # the checked first step is one of the warm-up steps
        for step in providers.values():
            step()
    return summarize(time_rounds(providers, rounds))


def main(argv=None) -> int:
    return run_cli(measure, "training step (SGD)", __doc__.split("\n\n")[0], rounds=20,
                   argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
