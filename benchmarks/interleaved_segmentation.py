"""Eval forward of torchvision's segmentation models (dilated ResNet-50 body) converted by
fusedres, against eager and torch.compile, interleaved round by round.

Providers, each called once per round in an order rotated from round to round (channels_last,
float32, the cpu backend):

- ``eager_cl``: the torchvision model as it is.
- ``compile``: torch.compile of it with inductor's ``freezing`` (BN folded into the convolutions).
- ``fused``: ``fusedres.convert(model)``: the dilated body fused; the heads run as they are.
- ``fused_sequentials``: ``fusedres.convert(model, sequentials=True)``: the heads' conv + BN +
  ReLU units fused too (fcn's 3x3 head, deeplabv3's ASPP branches and projection).

It prints each one's median, interquartile range, and the median over rounds of eager_cl's
(and torch.compile's) time divided by its time in the same round, with a 95% interval. Needs
torchvision.

    python benchmarks/interleaved_segmentation.py --model fcn_resnet50,deeplabv3_resnet50
"""

from __future__ import annotations

import argparse
import copy

import torch

import fusedres
from interleaved_inference import print_runs, summarize, time_rounds


def _model(name: str) -> torch.nn.Module:
    """torchvision's ``name`` (21 classes, no auxiliary head) with non-trivial BN parameters and
    statistics, channels_last, in eval."""
    from torchvision.models import segmentation
    torch.manual_seed(0)
    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=21,
                                        aux_loss=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.to(memory_format=torch.channels_last).eval()


def measure(name: str, batch: int, size: int, rounds: int, warmup: int,
            with_compile: bool) -> dict:
    eager = _model(name)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    models = {"eager_cl": eager}
    if with_compile:
        with torch._inductor.config.patch(freezing=True):
            models["compile"] = torch.compile(copy.deepcopy(eager), dynamic=False)
            with torch.no_grad():
                models["compile"](x)  # compiles here, with freezing in force
    models["fused"] = fusedres.convert(copy.deepcopy(eager), backend="cpu")
    models["fused_sequentials"] = fusedres.convert(copy.deepcopy(eager), backend="cpu",
                                                   sequentials=True)
    providers = {k: (lambda m=m: m(x)["out"]) for k, m in models.items()}
    with torch.no_grad():
        expected = providers["eager_cl"]()
        for k, run in providers.items():
            for _ in range(warmup):
                out = run()
            torch.testing.assert_close(out, expected, rtol=1e-3,
                                       atol=1e-3 * expected.abs().max().item(), msg=k)
        return summarize(time_rounds(providers, rounds))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fcn_resnet50,deeplabv3_resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    args = p.parse_args(argv)
    try:
        import torchvision
    except ImportError as e:
        p.error(f"the segmentation models are torchvision's (pip install torchvision): {e}")
    print_runs(args.model.split(","),
               lambda name: measure(name, args.batch, args.size, args.rounds, args.warmup,
                                    not args.no_compile),
               lambda name: (f"{name} batch {args.batch} {args.size}px eval forward, float32 "
                             f"channels_last, {args.rounds} interleaved rounds; speedups: median "
                             "of per-round ratios [95% CI]"),
               versions=f", torchvision {torchvision.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
