"""The main job (``python -m fusedres``): check fused against eager, time them, write a report.

What it does, printing progress as it goes:

1. detects the device and lists the usable backends (and why the others are not);
2. checks every fused backend against eager PyTorch on a ResNet (default ResNet-50) in training
   mode: logits and a few parameter gradients, max abs/rel error against eager in the same
   dtype, and DESIGN.md's rule against a float64 oracle (relative L2 error at most 2x eager's
   plus an atol, the rule tests/conftest.py uses for whole networks);
3. times each provider (eager NCHW, eager channels_last, ``torch.compile`` when asked for, each
   usable fused backend): a training step (forward, backward, SGD) and an eval forward, in
   images/s, with memory (see :func:`saved_bytes` and :func:`peak_memory`) and the bytes-moved
   model of :mod:`fusedres.traffic` as the fused/eager traffic ratio;
4. prints a table and writes ``report.json`` and ``report.png`` (matplotlib; without it, the JSON
   only) into the results folder (``--out``, default ``fusedres_results/``).

The provider machinery (:class:`Provider`, :func:`build_model`, :func:`time_interleaved`, ...) is
shared with the pytest-benchmark suites in ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedres
from fusedres import reference, traffic

__all__ = [
    "BOTTLENECK_TARGETS", "Config", "MEMORY_BOUND_TARGET", "Provider", "bench_targets",
    "build_model", "check_against_eager", "cpu_peak_memory", "default_config",
    "format_bench_cases", "format_targets", "main", "make_eval_step", "make_train_step",
    "peak_memory", "provider_status", "run", "saved_bytes", "sync", "time_interleaved",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# DESIGN.md's tolerance rule on the relative L2 error (tests/conftest.py's atol per dtype).
ATOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Gradients the check compares; these names exist in every torchvision ResNet.
MIN_CHECK_IMAGE = 64
GRAD_NAMES = ("conv1.weight", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
              "layer4.0.downsample.0.weight", "fc.weight")


# -- providers -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Provider:
    """One way of running a model: a backend, a memory format, optionally torch.compile.

    Attributes:
        name: ``eager`` (NCHW), ``eager_cl`` (channels_last), ``compile`` (torch.compile of the
            eager model, channels_last), a fused backend name in the layout its device favours
            (``triton``, ``cuda``: channels_last; ``cpu``: NCHW, PyTorch's CPU default, where
            ATen's CPU convolutions measured faster here), or ``cpu_cl`` (the cpu backend,
            channels_last).
        backend: ``"eager"`` or the fused backend name.
    """

    name: str
    backend: str
    channels_last: bool
    compiled: bool = False


def make_provider(name: str) -> Provider:
    """The provider called ``name`` (see :class:`Provider` for the names and their layouts)."""
    if name == "eager":
        return Provider("eager", "eager", False)
    if name == "eager_cl":
        return Provider("eager_cl", "eager", True)
    if name == "compile":
        return Provider("compile", "eager", True, compiled=True)
    if name == "cpu":
        return Provider("cpu", "cpu", False)
    if name == "cpu_cl":
        return Provider("cpu_cl", "cpu", True)
    return Provider(name, name, True)


def provider_status(provider: Provider, device: torch.device) -> tuple[bool, str]:
    """(usable on ``device``, why or why not)."""
    if provider.compiled:
        if device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
            return False, "torch.compile on CPU needs a C++ compiler (none found)"
        return True, "torch.compile (inductor)"
    if provider.backend == "eager":
        return True, "plain PyTorch"
    try:
        backend = fusedres.get_backend(provider.backend)
    except (ValueError, RuntimeError) as e:
        return False, str(e)
    ok, why = backend.availability()
    if not ok:
        return False, why
    if device.type not in backend.device_types:
        return False, f"runs on {'/'.join(backend.device_types)} tensors, not {device.type}"
    if device.type == "cpu" and provider.backend == "triton":
        return False, "TRITON_INTERPRET=1 runs the Triton kernels in the CPU interpreter: not timed"
    return True, why


def default_providers(device: torch.device) -> list[str]:
    """eager, eager_cl and every fused backend (unusable ones are reported, not run); on the
    CPU the cpu backend in both layouts."""
    fused = [b for b in fusedres.BACKEND_NAMES if b != "eager"]
    if device.type == "cpu":
        fused.insert(fused.index("cpu") + 1, "cpu_cl")
    return ["eager", "eager_cl"] + fused


def build_model(arch: str, provider: Provider, device: torch.device,
                base: Optional[nn.Module] = None) -> nn.Module:
    """A ResNet for ``provider`` on ``device``: plain PyTorch modules for eager providers.

    Args:
        arch: a builder name in fusedres.models (``resnet18``, ``resnet50``, ...).
        base: a model whose weights to copy (so every provider runs the same network); a fresh
            fusedres.models one when None.
    """
    model = copy.deepcopy(base) if base is not None else getattr(fusedres.models, arch)()
    if provider.backend == "eager":
        model = fusedres.to_eager(model)
    else:
        model = fusedres.convert(model, provider.backend)
    model = model.to(device)
    if provider.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if provider.compiled:
        # Static shapes: a second shape would otherwise recompile with dynamic sizes, slower code.
        model = torch.compile(model, dynamic=False)
    return model


def as_input(x: torch.Tensor, provider: Provider) -> torch.Tensor:
    """x [N, C, H, W] in the provider's memory format."""
    fmt = torch.channels_last if provider.channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


# -- measuring -----------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    """Waits for the device's queued kernels, so a host timer measures them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision (parameters stay float32) for a 16-bit dtype, else nothing."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def time_interleaved(fns: dict, steps: int, warmup: int, device: torch.device) -> dict:
    """Seconds of one call of each function in ``fns``, each call synchronised.

    After ``warmup`` untimed calls of each, ``steps`` rounds call every function once in turn,
    so a slow spell of a shared machine falls on all of them rather than on whichever was being
    timed then. Returns ``{key: fastest call}``: the other calls carry other processes' time.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        sync(device)
    times = {key: [] for key in fns}
    for _ in range(steps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {key: min(t) for key, t in times.items()}


def saved_bytes(fn: Callable[[], object], exclude: tuple = ()) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs (a forward pass), parameters excluded.

    Uses ``torch.autograd.graph.saved_tensors_hooks``: every tensor an op or autograd Function
    saves passes through the pack hook; storages are counted once. Device-independent and exact
    for what backward holds (``tracemalloc`` does not see tensor memory), but it is not a peak:
    it leaves out workspaces and the transient tensors of the forward.

    Args:
        fn: runs a forward pass with autograd recording.
        exclude: tensors (parameters) whose storages are not counted.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes a call of ``fn`` allocates beyond what was allocated before it: activations,
    gradients, workspaces; not the weights or optimizer state, which are the same for every
    provider and would make the figure depend on what else is alive.

    On CUDA the caching allocator's counters give it. On the CPU, :func:`cpu_peak_memory`
    replays torch.profiler's record of the CPU allocator; the profiler slows ``fn`` down, so
    call this outside timed loops (the benchmarks and the main job do). None on other devices.
    """
    if device.type == "cpu":
        return cpu_peak_memory(fn)
    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def cpu_peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory that a call of ``fn`` allocates beyond what was live
    before it.

    Runs ``fn`` under ``torch.profiler.profile(profile_memory=True)``: c10's CPU allocator then
    reports every allocation and free with its running total of the bytes allocated while
    profiling, tensors that ops allocate inside their kernels (workspaces) included. The peak is
    the largest running total minus the total before the first allocation. The allocator does
    not report the free of a block it allocated while no profiler ran, so freeing such memory
    does not lower the total: the figure can only err high, by such memory. Memory that a
    library allocates with its own allocator (oneDNN's scratchpads) is not seen: it is the same
    for every provider's convolutions.

    Args:
        fn: the call to measure, e.g. a training step.

    Returns:
        Bytes, 0 when ``fn`` allocates nothing.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocation = torch._C._profiler._ExtraFields_Allocation
    events = []  # (time, bytes allocated (+) or freed (-), running total after it)
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        fields = node.extra_fields
        if isinstance(fields, allocation) and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
    if not events:
        return 0
    events.sort(key=lambda e: e[0])
    _, first_bytes, first_total = events[0]
    return max(total for _, _, total in events) - (first_total - first_bytes)


def make_train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                    dtype: torch.dtype) -> Callable[[], None]:
    """One training step: forward, cross-entropy, backward, SGD (momentum 0.9) step.

    Args:
        x: [N, 3, H, W] input; target: [N] class indices.
    """
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    device = x.device

    def step():
        with autocast(device, dtype):
            out = model(x)
        F.cross_entropy(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_eval_step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """One inference forward (eval mode, no autograd). x: [N, 3, H, W]."""
    model.eval()

    def step():
        with torch.inference_mode(), autocast(x.device, dtype):
            model(x)

    return step


# -- the error check -----------------------------------------------------------------------------

def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def check_against_eager(arch: str, providers: list, device: torch.device, dtype: torch.dtype,
                        batch: int, image_size: int, seed: int = 0) -> dict:
    """Compares fused models with eager PyTorch and a float64 oracle, one training step.

    Forward in training mode (batch statistics), backward of a fixed random output gradient.
    Eager and the oracle run once and serve every provider. On the CPU all of them run ATen's
    native convolutions (reference.oracle_convolutions: oneDNN's backward disagrees with float64
    there), so the check measures fusedres's kernels.

    Args:
        providers: fused providers.
        batch, image_size: the input [batch, 3, size, size]; sizes below MIN_CHECK_IMAGE are
            raised to it.

    Returns:
        ``{provider name: {"ok": bool, "batch", "image_size", "tensors": {name: {"max_abs",
        "max_rel", "rel_l2_fused", "rel_l2_eager", "bound", "ok"}}}}``: max_abs/max_rel of fused
        against eager in the same dtype (max_rel = max_abs / max |eager|); rel_l2 of each against
        the oracle; ok when rel_l2_fused <= bound = 2 * rel_l2_eager + ATOL[dtype].
    """
    # The last stage runs at image_size/32; below 64 px it is 1x1 and BatchNorm reduces over
    # `batch` values per channel, so ill-conditioned that fp32 eager itself is 1e-2 off fp64.
    image_size = max(image_size, MIN_CHECK_IMAGE)
    torch.manual_seed(seed)
    base = getattr(fusedres.models, arch)()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    gy = torch.randn(batch, 1000, device=device)

    def run_one(model, inp, grad, dt):
        model.train()
        with autocast(device, dt):
            out = model(inp)
        out.backward(grad.to(out.dtype))
        params = dict(model.named_parameters())
        return {"logits": out.detach(), **{n: params[n].grad for n in GRAD_NAMES}}

    eager_p = make_provider("eager")
    with reference.oracle_convolutions(device):
        ref = run_one(build_model(arch, eager_p, device, base), x, gy, dtype)
        exact = run_one(reference.upcast(build_model(arch, eager_p, device, base)), x.double(),
                        gy.double(), torch.float64)
        got_all = {p.name: run_one(build_model(arch, p, device, base), as_input(x, p), gy, dtype)
                   for p in providers}
    results = {}
    for provider in providers:
        got = got_all[provider.name]
        tensors, ok = {}, True
        for name in got:
            diff = (got[name].double() - ref[name].double()).abs().max().item()
            scale = ref[name].double().abs().max().item()
            e_fused, e_eager = _rel_l2(got[name], exact[name]), _rel_l2(ref[name], exact[name])
            bound = 2 * e_eager + ATOL[dtype]
            tensors[name] = {"max_abs": diff, "max_rel": diff / scale if scale > 0 else diff,
                             "rel_l2_fused": e_fused, "rel_l2_eager": e_eager, "bound": bound,
                             "ok": e_fused <= bound}
            ok &= e_fused <= bound
        results[provider.name] = {"ok": ok, "batch": batch, "image_size": image_size,
                                  "tensors": tensors}
    return results


# -- the job ------------------------------------------------------------------------------------

@dataclass
class Config:
    """Settings of one run; :func:`default_config` fills them per device."""

    device: str
    dtype: str
    arch: str
    batch: int
    image_size: int
    steps: int
    warmup: int
    check_batch: int
    backends: list = field(default_factory=list)
    out: str = "fusedres_results"


def default_config(device: str) -> Config:
    """Small on CPU (the whole job in well under 2 minutes on 2 cores), real on a GPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return Config(device, "bfloat16", "resnet50", batch=256, image_size=224, steps=20,
                      warmup=5, check_batch=16, backends=default_providers(dev))
    return Config(device, "float32", "resnet50", batch=4, image_size=64, steps=8, warmup=2,
                  check_batch=4, backends=default_providers(dev))


def machine_info(device: torch.device) -> dict:
    """Device name, CPU count, software versions and the date: what a result must carry."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host_platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "fusedres": fusedres.__version__,
            "cpu_count": os.cpu_count(), "device": device.type,
            # Other processes' load while this ran (timings on a shared machine need it).
            "load_average_1min": os.getloadavg()[0]}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device_name"] = _cpu_model()
        info["torch_threads"] = torch.get_num_threads()
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Progress:
    def __init__(self, quiet: bool = False):
        self.t0, self.quiet = time.perf_counter(), quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _traffic(arch: str, backend: str, cfg: Config, training: bool) -> Optional[int]:
    if backend not in traffic.FUSIONS:
        return None
    itemsize = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    return traffic.model_traffic(arch, cfg.batch, cfg.image_size, backend, training,
                                 itemsize).total


def run(cfg: Config, quiet: bool = False) -> dict:
    """Runs the job for ``cfg`` and returns the report (also written to ``cfg.out``)."""
    log = _Progress(quiet)
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    report = {"machine": machine_info(device), "config": asdict(cfg),
              "backends": {k: list(v) for k, v in fusedres.available_backends().items()},
              "check": {}, "results": [], "skipped": []}
    log(f"device {device} ({report['machine']['device_name']}), torch {torch.__version__}, "
        f"{cfg.arch} batch {cfg.batch} {cfg.image_size}x{cfg.image_size} {cfg.dtype}")
    providers = []
    for name in cfg.backends:
        p = make_provider(name)
        ok, why = provider_status(p, device)
        if ok:
            providers.append(p)
        else:
            report["skipped"].append({"provider": name, "reason": why})
            log(f"skip {name}: {why}")

    fused = [p for p in providers if p.backend != "eager"]
    if fused:
        log(f"checking {', '.join(p.name for p in fused)} against eager and a float64 oracle "
            f"({cfg.arch}, batch {cfg.check_batch}, training step"
            + ("; ATen's native CPU convolutions, see reference.oracle_convolutions)"
               if device.type == "cpu" else ")"))
        report["check"] = check_against_eager(cfg.arch, fused, device, dtype, cfg.check_batch,
                                              cfg.image_size)
    for name, chk in report["check"].items():
        for tname, e in chk["tensors"].items():
            log(f"  {name} {tname:28s} max abs {e['max_abs']:.2e}  max rel {e['max_rel']:.2e}  "
                f"rel-L2 vs fp64: fused {e['rel_l2_fused']:.2e} eager {e['rel_l2_eager']:.2e}"
                f"  {'ok' if e['ok'] else 'FAIL'}")
    _dump(report, cfg.out)  # a run cut short (a timeout) keeps the check

    torch.manual_seed(0)
    base = getattr(fusedres.models, cfg.arch)()
    x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, device=device)
    target = torch.randint(0, 1000, (cfg.batch,), device=device)
    models = {}
    for p in providers:
        model = build_model(cfg.arch, p, device, base)
        xin = as_input(x, p)
        models[p.name] = (model, xin, make_train_step(model, xin, target, dtype))
    log(f"timing train steps ({', '.join(models)} in turn): {cfg.warmup} warm-up + best of "
        f"{cfg.steps} each")
    t_train = time_interleaved({name: m[2] for name, m in models.items()}, cfg.steps,
                               cfg.warmup, device)
    memory = {}
    for p in providers:
        model, xin, train = models[p.name]
        saved = None
        if not p.compiled:
            # Compiled graphs keep their own saved tensors out of these hooks' sight.
            def fwd():
                with autocast(device, dtype):
                    model(xin)
            saved = saved_bytes(fwd, exclude=tuple(model.parameters()))
        memory[p.name] = (peak_memory(train, device), saved)
    log(f"timing eval forwards: {cfg.warmup} warm-up + best of {cfg.steps} each")
    t_eval = time_interleaved({name: make_eval_step(model, xin, dtype)
                               for name, (model, xin, _) in models.items()}, cfg.steps,
                              cfg.warmup, device)
    del models
    for p in providers:
        tt, te = t_train[p.name], t_eval[p.name]
        report["results"].append({
            "provider": p.name, "backend": p.backend, "channels_last": p.channels_last,
            "compiled": p.compiled, "train_step_s": tt, "eval_step_s": te,
            "train_images_per_s": cfg.batch / tt, "eval_images_per_s": cfg.batch / te,
            "peak_allocated_bytes": memory[p.name][0], "saved_activation_bytes": memory[p.name][1],
            "traffic_train_bytes": None if p.compiled else _traffic(cfg.arch, p.backend, cfg, True),
            "traffic_eval_bytes": None if p.compiled else _traffic(cfg.arch, p.backend, cfg, False),
        })

    eager = next((r for r in report["results"] if r["provider"] == "eager"), None)
    for r in report["results"]:
        for mode in ("train", "eval"):
            r[f"speedup_{mode}"] = (r[f"{mode}_images_per_s"] / eager[f"{mode}_images_per_s"]
                                    if eager else None)
            mine, ref = r[f"traffic_{mode}_bytes"], eager and eager[f"traffic_{mode}_bytes"]
            r[f"traffic_ratio_{mode}"] = mine / ref if (mine and ref) else None
    report["elapsed_s"] = time.perf_counter() - log.t0
    write(report, cfg.out, log)
    if not quiet:
        print(format_table(report), flush=True)
    return report


def format_table(report: dict) -> str:
    """The results as a Markdown table (what README files quote)."""
    m, c = report["machine"], report["config"]
    lines = [f"{c['arch']}, batch {c['batch']}, {c['image_size']}x{c['image_size']}, {c['dtype']}, "
             f"{m['device_name']} ({m['cpu_count']} CPUs, load {m['load_average_1min']:.1f}), "
             f"torch {m['torch']}, {m['date'][:10]}",
             "",
             "| provider | train img/s | eval img/s | peak train step memory | saved activations "
             "| speedup train | speedup eval | bytes moved vs eager (train / eval) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        ratio = ("-" if r["traffic_ratio_train"] is None
                 else f"{r['traffic_ratio_train']:.2f} / {r['traffic_ratio_eval']:.2f}")
        sp = [("-" if r[k] is None else f"{r[k]:.2f}x") for k in ("speedup_train", "speedup_eval")]
        lines.append(f"| {r['provider']} | {r['train_images_per_s']:.1f} | "
                     f"{r['eval_images_per_s']:.1f} | {_fmt_bytes(r['peak_allocated_bytes'])} | "
                     f"{_fmt_bytes(r['saved_activation_bytes'])} | {sp[0]} | {sp[1]} | {ratio} |")
    for s in report["skipped"]:
        lines.append(f"\nskipped {s['provider']}: {s['reason']}")
    checks = [f"{name}: {'ok' if chk['ok'] else 'FAILED'}" for name, chk in report["check"].items()]
    if checks:
        lines.append("\nerror check vs eager / fp64 oracle: " + ", ".join(checks))
    return "\n".join(lines)


# -- benchmark summaries (benchmarks/conftest.py's terminal summary, scripts/gpu_validate.sh) ---

#: Targets of a fused Bottleneck's training step (forward + backward): speedup over the faster
#: eager layout and over torch.compile of the eager block, in the same run.
BOTTLENECK_TARGETS = {"eager": 1.3, "compile": 1.1}
#: A memory-bound kernel's target: this fraction of the device's measured copy bandwidth.
MEMORY_BOUND_TARGET = 0.8


def _groups(cases: list) -> dict:
    """{group: {provider: case}} in the order the cases ran (a provider's last case wins)."""
    groups: dict = {}
    for case in cases:
        groups.setdefault(case["group"], {})[case["extra_info"]["provider"]] = case
    return groups


def _eager_baseline(provs: dict) -> Optional[dict]:
    """The group's NCHW ``eager`` case, else ``eager_cl``, else None."""
    return provs.get("eager") or provs.get("eager_cl")


def _num(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_bench_cases(cases: list) -> str:
    """Benchmark cases as one small table per group.

    Columns: provider, median ms per call, GB/s (the case's byte count over the median),
    images/s, speedup over the group's eager provider (``eager``, NCHW, or ``eager_cl`` where
    the group has no NCHW eager), and ``traffic_ratio_vs_eager`` (bytes the eager sequence moves
    / bytes this provider moves, by :mod:`fusedres.traffic`). "-" where not measured.

    Args:
        cases: dicts ``{"group", "name", "median_s", "extra_info"}`` with
            ``extra_info["provider"]``, as benchmarks/conftest.py logs each case.
    """
    lines = []
    for group, provs in _groups(cases).items():
        eager = _eager_baseline(provs)
        lines += [group, f"  {'provider':10s} {'median ms':>10s} {'GB/s':>8s} {'images/s':>10s} "
                         f"{'vs eager':>9s} {'bytes eager/own':>16s}"]
        for name, case in provs.items():
            info, median = case["extra_info"], case["median_s"]
            speedup = eager["median_s"] / median if eager else None
            lines.append(f"  {name:10s} {median * 1e3:10.3f} {_num(info.get('GB/s'), '.1f'):>8s} "
                         f"{_num(info.get('images/s'), '.1f'):>10s} "
                         f"{_num(speedup, '.2f') + ('x' if speedup else ''):>9s} "
                         f"{_num(info.get('traffic_ratio_vs_eager'), '.2f'):>16s}")
    return "\n".join(lines)


def bench_targets(cases: list, copy_gbps: Optional[float]) -> list:
    """Benchmark cases measured against the targets; nothing is asserted.

    - every fused provider's Bottleneck training step (block cases with ``kind`` bottleneck and
      ``mode`` train): speedup over the faster of the group's eager layouts and over its
      torch.compile provider, against :data:`BOTTLENECK_TARGETS`;
    - every fused provider's memory-bound kernel (``memory_bound`` in extra_info): GB/s as a
      fraction of ``copy_gbps``, against :data:`MEMORY_BOUND_TARGET` (skipped without it).

    Args:
        cases: as for :func:`format_bench_cases`.
        copy_gbps: the device's measured copy bandwidth (read + write), or None.

    Returns:
        Rows ``{"what", "provider", "measured", "ok"}``: ``measured`` a readable string; ``ok``
        True or False, or None where a comparison is missing (no eager or no compile case).
    """
    rows = []
    for group, provs in _groups(cases).items():
        for name, case in provs.items():
            info = case["extra_info"]
            if info.get("backend", "eager") == "eager" or info.get("compiled"):
                continue
            if info.get("kind") == "bottleneck" and info.get("mode") == "train":
                eager = [c["median_s"] for c in provs.values()
                         if c["extra_info"].get("backend") == "eager"
                         and not c["extra_info"].get("compiled")]
                compiled = [c["median_s"] for c in provs.values() if c["extra_info"].get("compiled")]
                vs = {"eager": min(eager) / case["median_s"] if eager else None,
                      "compile": min(compiled) / case["median_s"] if compiled else None}
                measured = ", ".join(f"{_num(v, '.2f')}x {k} (>= {BOTTLENECK_TARGETS[k]}x)"
                                     for k, v in vs.items())
                ok = (None if None in vs.values()
                      else all(vs[k] >= BOTTLENECK_TARGETS[k] for k in vs))
                rows.append({"what": group, "provider": name, "measured": measured, "ok": ok})
            elif info.get("memory_bound") and copy_gbps and info.get("GB/s") is not None:
                frac = info["GB/s"] / copy_gbps
                rows.append({"what": group, "provider": name,
                             "measured": f"{info['GB/s']:.0f} GB/s = {frac:.0%} of copy "
                                         f"(>= {MEMORY_BOUND_TARGET:.0%})",
                             "ok": frac >= MEMORY_BOUND_TARGET})
    return rows


def format_targets(cases: list, copy_gbps: Optional[float]) -> str:
    """:func:`bench_targets` as lines ending in PASS, FAIL or n/a, with a count."""
    rows = bench_targets(cases, copy_gbps)
    lines = [f"targets (measured, not asserted): Bottleneck train step >= "
             f"{BOTTLENECK_TARGETS['eager']}x eager (faster layout) and >= "
             f"{BOTTLENECK_TARGETS['compile']}x torch.compile; memory-bound kernels >= "
             f"{MEMORY_BOUND_TARGET:.0%} of the copy bandwidth"
             + (f" ({copy_gbps:.0f} GB/s)" if copy_gbps else " (not measured: no check)")]
    for r in rows:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[r["ok"]]
        lines.append(f"  {verdict:4s} {r['what']} {r['provider']}: {r['measured']}")
    judged = [r for r in rows if r["ok"] is not None]
    lines.append(f"  {sum(r['ok'] for r in judged)} of {len(judged)} targets met"
                 + (f", {len(rows) - len(judged)} not comparable" if len(judged) < len(rows) else ""))
    return "\n".join(lines)


def _dump(report: dict, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return path


def write(report: dict, out: str, log: Callable[[str], None]) -> None:
    """Writes report.json and, when matplotlib is importable, report.png into ``out``."""
    os.makedirs(out, exist_ok=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report["plot"] = None
        log("matplotlib is not installed: writing the JSON only (pip install matplotlib)")
    else:
        names = [r["provider"] for r in report["results"]]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, mode in zip(axes, ("train", "eval")):
            vals = [r[f"{mode}_images_per_s"] for r in report["results"]]
            bars = ax.bar(names, vals, color=["#888" if r["backend"] == "eager" else "#2a7"
                                              for r in report["results"]])
            for b, r in zip(bars, report["results"]):
                if r[f"speedup_{mode}"] is not None:
                    ax.annotate(f"{r[f'speedup_{mode}']:.2f}x", (b.get_x() + b.get_width() / 2,
                                b.get_height()), ha="center", va="bottom", fontsize=8)
            ax.set_title(f"{mode} images/s")
            ax.tick_params(axis="x", labelrotation=20)
        c, m = report["config"], report["machine"]
        fig.suptitle(f"{c['arch']} batch {c['batch']} {c['image_size']}px {c['dtype']} on "
                     f"{m['device_name']} ({m['cpu_count']} CPUs, load {m['load_average_1min']:.1f})",
                     fontsize=9)
        fig.tight_layout()
        report["plot"] = os.path.join(out, "report.png")
        fig.savefig(report["plot"], dpi=110)
        plt.close(fig)
    path = _dump(report, out)
    log(f"wrote {path}" + (f" and {report['plot']}" if report.get("plot") else ""))


def parse_args(argv: Optional[list] = None) -> Config:
    ap = argparse.ArgumentParser(
        prog="python -m fusedres",
        description="Check the fused backends against eager PyTorch on a ResNet, time them, "
                    "and write a JSON + PNG report.")
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    ap.add_argument("--arch", default=None, help="resnet18, resnet34, resnet50, ... "
                    "(default resnet50)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="float32, or bfloat16/float16 autocast (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated providers: eager, eager_cl, compile, cpu, triton, cuda "
                         "(default: all but compile; unusable ones are skipped with the reason)")
    ap.add_argument("--out", default="fusedres_results", help="results folder")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = default_config(device)
    for key in ("arch", "batch", "image_size", "steps", "dtype"):
        if getattr(a, key) is not None:
            setattr(cfg, key, getattr(a, key))
    cfg.dtype = str(DTYPES[cfg.dtype]).removeprefix("torch.")
    cfg.check_batch = min(cfg.check_batch, cfg.batch)
    if a.backends:
        cfg.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    cfg.out = a.out
    return cfg


def main(argv: Optional[list] = None) -> int:
    """Entry point of ``python -m fusedres``; exits 1 when an error check fails."""
    report = run(parse_args(argv))
    return 0 if all(c["ok"] for c in report["check"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
