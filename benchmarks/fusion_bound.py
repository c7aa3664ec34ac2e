"""How much faster than eager fusion alone can make a ResNet step on this machine: eager's step
profiled op by op, its time split into what the fused units remove and what they keep.

Fusion (one pass for BatchNorm, ReLU and the residual add, their backward in one more; BN folded
into the convolution in eval; units and blocks as single ops, with no module calls between them)
removes eager's BatchNorm, ReLU, threshold_backward and residual-add ops, forward and backward,
and, generously, all of the host time between eager's ops. In training it keeps the
convolutions, autocast's weight casts (the weights change every step), the optimizer, the
stem's pooling, the classifier and the loss. With the convolutions as eager runs them, a fused
step can take no less than eager's time minus the part it removes:

    bound = eager step / (eager step - BatchNorm, ReLU and residual-add time - host time)

In eval the folded weights are cached in the compute dtype, so the casts go too (the second
bound). A fused ratio above the bound comes from faster convolutions, not from fusion: the cpu
backend's GEMM path, Winograd's F(2x2, 3x3) in float32 eval (docs/design.md section 4), and in
eval oneDNN's prepacked weights, which spare the reorder into its blocked layout that eager's
convolutions make on every call (counted here as convolution time). The split is the
profiler's self time per op (each op's own time, its children's excluded), averaged over the
profiled steps and scaled to the median unprofiled step; "host" is the profiled step's time
outside every op. The profiler's own cost per op inflates the many small ops a little, so the
bounds are, if anything, generous.

    python benchmarks/fusion_bound.py --arch resnet50,resnet18 --dtype float32,bfloat16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fusedres
from fusedres.report import keep_freed_memory, machine_info, make_eval_step, make_train_step

# Op names per category: substrings, then exact names (the residual adds: a substring "aten::add"
# would take the classifier's addmm too). An op counts where its outermost categorised caller
# does (a copy inside convolution_backward is the convolution's), and anything under the
# optimizer's step or zero_grad is the optimizer's.
_CATEGORIES = (
    ("convolution", ("convolution",), ()),
    ("removed by fusion", ("batch_norm", "relu", "threshold_backward", "clamp_min"),
     ("aten::add", "aten::add_")),
    ("copies and casts", ("copy_", "_to_copy"), ()),
)
_OPTIMIZER_SCOPES = ("Optimizer.step", "Optimizer.zero_grad")


def _category(event) -> str:
    found = "other ops"
    while event is not None:
        if event.name.startswith(_OPTIMIZER_SCOPES):
            return "optimizer"
        for name, substrings, names in _CATEGORIES:
            if event.name in names or any(p in event.name for p in substrings):
                found = name
                break
        event = event.cpu_parent
    return found


def split_step(step, steps: int) -> tuple[float, dict]:
    """Median seconds of ``step`` unprofiled, and its profiled self time per category in seconds
    per step, scaled so that the categories (with "host": the time outside every op) sum to it.

    Args:
        step: a callable running one step.
        steps: how many steps to time and to profile.
    """
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    # acc_events: torch 2.11 and 2.12 warn without it (fusedres.report.cpu_peak_memory).
    with profile(activities=[ProfilerActivity.CPU], acc_events=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        profiled = (time.perf_counter() - start) / steps
    split: dict = {}
    for event in prof.events():
        if event.name.startswith(_OPTIMIZER_SCOPES) or event.device_type.name != "CPU":
            continue  # scopes: their ops are counted below them
        cat = _category(event)
        split[cat] = split.get(cat, 0.0) + event.self_cpu_time_total / 1e6 / steps
    split["host"] = max(0.0, profiled - sum(split.values()))
    scale = median / profiled
    return median, {k: v * scale for k, v in split.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50,resnet18")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--mode", default="train,eval")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    keep_freed_memory()  # as the main job and the interleaved benchmarks
    print(f"{machine_info(torch.device('cpu'))['cpu_model']}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; eager (torchvision's ResNet code), channels_last, batch "
          f"{args.batch} at {args.size}x{args.size}; ms per step and share of it")
    order = ["convolution", "removed by fusion", "copies and casts", "optimizer", "other ops",
             "host"]
    print(f"\n{'case':>24} {'step ms':>8}" + "".join(f" {c:>17}" for c in order)
          + f" {'bound':>7} {'+ casts':>8}")
    for arch in args.arch.split(","):
        torch.manual_seed(0)
        model = fusedres.to_eager(getattr(fusedres.models, arch)(backend="cpu"))
        model = model.to(memory_format=torch.channels_last)
        x = torch.randn(args.batch, 3, args.size, args.size).contiguous(
            memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (args.batch,))
        for dtype_name in args.dtype.split(","):
            dtype = getattr(torch, dtype_name)
            for mode in args.mode.split(","):
                m = copy.deepcopy(model)
                step = (make_train_step(m, x, target, dtype) if mode == "train"
                        else make_eval_step(m, x, dtype))
                for _ in range(3):
                    step()
                median, split = split_step(step, args.steps)
                fused_away = split.get("removed by fusion", 0.0)
                if fused_away == 0.0 or split.get("convolution", 0.0) == 0.0:
                    raise SystemExit(f"{arch} {dtype_name} {mode}: no BatchNorm or convolution "
                                     f"op in eager's profile (found: {sorted(split)}): have "
                                     "their op names changed in this torch?")
                removed = fused_away + split["host"]
                casts = split.get("copies and casts", 0.0)
                shares = [split.get(c, 0.0) for c in order]
                cells = "".join(f" {t * 1e3:7.1f} ({t / median:5.1%})" for t in shares)
                case = f"{arch} {dtype_name} {mode}"
                print(f"{case:>24} {median * 1e3:8.1f}{cells} {median / (median - removed):6.3f}x"
                      f" {median / (median - removed - casts):7.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
