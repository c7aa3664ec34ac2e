"""The main job (``python -m fusedres``): fused ResNets against eager PyTorch, torch.compile and
onnxruntime, checked and timed in one run.

For every architecture (``--arch``, default resnet50), dtype (float32, plus bfloat16 autocast
where the CPU has native bf16 matrix instructions, see :func:`native_bf16`; bfloat16 on a GPU)
and mode (a training step; an eval forward), one *group*:

1. every provider's model is built from the same weights (random BatchNorm affine parameters
   and calibrated running statistics, so that eval's folding is exercised) and called once,
   untimed: torch.compile compiles here (train: default inductor; eval: inductor with
   ``freezing``, oneDNN's conv + BN fold on the CPU), the onnxruntime provider exports
   ``fusedres.to_eager(model)`` here; a training step's first call is then undone (weights,
   statistics, optimizer), so that the check sees the same weights everywhere;
2. every provider is checked against eager PyTorch in the same dtype and a float64 oracle
   (docs/design.md's rule: relative L2 error at most 2x eager's plus an atol): logits and a few
   gradients in training, logits in eval;
3. the providers are timed round by round, every provider once per round, the order rotating,
   after warm-up rounds (:func:`time_interleaved`); per provider the median and the spread (the
   interquartile range over the median), and ratios to eager (the faster of ``eager`` and
   ``eager_cl``) and to torch.compile, each with the range the two providers' interquartile
   intervals allow. A ratio whose two intervals overlap is flagged: it is not a result;
4. in training, the peak memory of a step and the bytes saved for backward, after the timing.

The report (tables with the CPU model and the load average beside every figure, warnings,
the issue-13 targets) is printed, and ``report.json`` and ``report.png`` (matplotlib) are
written into ``--out``. A provider that raises is reported and the others are measured. Exit
status: 0, 1 when a fusedres provider fails its check or raises, 2 for a bad argument or when
no provider is usable.

The measuring machinery (:class:`Provider`, :class:`ModelGroup`, :func:`time_interleaved`,
:func:`summarize`, :func:`compare`, ...) is shared with the pytest-benchmark suites in
``benchmarks/``, whose summary :func:`format_bench_cases` prints.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import importlib.util
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedres
from fusedres import _ext, reference, traffic

__all__ = [
    "BOTTLENECK_TARGETS", "Config", "MEMORY_BOUND_TARGET", "MODEL_TARGETS", "ModelGroup",
    "NothingToRun", "PROVIDER_NAMES", "Provider", "bench_targets", "bn_ops", "build_model",
    "check_against_eager", "compare", "cpu_peak_memory", "default_config", "format_bench_cases",
    "format_table", "format_targets", "keep_freed_memory", "largest_batch", "machine_info",
    "main", "make_base", "make_eval_step", "make_onnx_step", "make_provider", "make_train_step",
    "model_targets", "native_bf16", "parse_args", "peak_memory", "provider_status", "run",
    "saved_bytes", "summarize", "sync", "time_interleaved", "warnings_of",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("train", "eval")
# docs/design.md's tolerance rule on the relative L2 error (tests/conftest.py's atol per dtype).
ATOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Below 64 px the last stage runs at 1x1 and BatchNorm reduces over `batch` values per channel:
# so ill-conditioned that fp32 eager itself is 1e-2 off float64, and the check means nothing.
MIN_CHECK_IMAGE = 64
# Gradients the check compares; these names exist in every torchvision ResNet.
GRAD_NAMES = ("conv1.weight", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
              "layer4.0.downsample.0.weight", "fc.weight")
# Fewer rounds give no interquartile range worth the name: no ratio is then a result.
MIN_ROUNDS_FOR_A_RESULT = 3


# -- the BatchNorm ops of each provider, for kernel benchmarks --------------------------------------


class _Eager:
    """fusedres.reference's BatchNorm ops in the storage dtype (statistics in fp32)."""

    @staticmethod
    def bn_stats(z):
        return reference.bn_stats(z, upcast=False)

    @staticmethod
    def bn_act_fwd(z, scale, shift, residual, relu):
        return reference.bn_act_fwd(z, scale, shift, residual, relu, upcast=False)

    @staticmethod
    def bn_act_bwd(dy, y, z, mean, invstd, weight, relu, has_residual, training):
        return reference.bn_act_bwd(dy, y, z, mean, invstd, weight, relu, has_residual, training,
                                    upcast=False)


class _Triton:
    """torch.ops.fusedres_triton's BatchNorm ops, with the C++ ops' arguments."""

    @staticmethod
    def bn_stats(z):
        return torch.ops.fusedres_triton.bn_stats(z)

    @staticmethod
    def bn_act_fwd(z, scale, shift, residual, relu):
        return torch.ops.fusedres_triton.bn_act_fwd(z, scale, shift, residual, relu)

    @staticmethod
    def bn_act_bwd(dy, y, z, mean, invstd, weight, relu, has_residual, training):
        return torch.ops.fusedres_triton.bn_act_bwd(dy, y, z, mean, invstd, weight, relu,
                                                    has_residual, training, True)


def bn_ops(provider: str):
    """The BatchNorm ops of a provider (``eager``, ``triton``, ``cpu``, ``cuda``) with the C++ ops'
    arguments: ``bn_stats``, ``bn_act_fwd``, ``bn_act_bwd`` (the kernel benchmarks time these)."""
    if provider == "eager":
        return _Eager
    if provider == "triton":
        import fusedres.ops.triton_library  # noqa: F401  (defines torch.ops.fusedres_triton)
        return _Triton
    return torch.ops.fusedres  # cpu and cuda: the C++ ops, dispatched on the tensors' device



# -- providers -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Provider:
    """One way of running a model.

    Attributes:
        name: ``eager`` (NCHW), ``eager_cl`` (channels_last), ``compile`` (torch.compile of the
            eager model, channels_last), ``onnxruntime`` (the exported eager model, eval only),
            a fused backend name in the layout its device favours (``triton``, ``cuda``:
            channels_last; ``cpu``: NCHW, PyTorch's CPU default), or ``cpu_cl`` (the cpu
            backend, channels_last); ``cpu_per_unit`` and ``cpu_conv1``: the cpu backend with
            its blocks' training recomputation ``"off"`` (the per-unit path, which keeps y1 and
            y2) or ``"conv1"`` (see :mod:`fusedres.ops.block`; ``cpu`` runs the default).
        backend: ``"eager"`` or the fused backend name.
        channels_last: the model and its input in channels_last.
        compiled: torch.compile of the eager model.
        onnx: onnxruntime (CPUExecutionProvider) on ``fusedres.to_eager(model)`` exported to ONNX.
        recompute: the fused blocks' ``recompute`` mode, or None for the default.
    """

    name: str
    backend: str
    channels_last: bool
    compiled: bool = False
    onnx: bool = False
    recompute: Optional[str] = None

    @property
    def fused(self) -> bool:
        """Runs fusedres's kernels (the providers whose check decides the exit status)."""
        return self.backend != "eager"


_PROVIDERS = {p.name: p for p in (
    Provider("eager", "eager", False), Provider("eager_cl", "eager", True),
    Provider("compile", "eager", True, compiled=True), Provider("cpu", "cpu", False),
    Provider("cpu_cl", "cpu", True), Provider("triton", "triton", True),
    Provider("cuda", "cuda", True), Provider("onnxruntime", "eager", False, onnx=True),
    Provider("cpu_per_unit", "cpu", False, recompute="off"),
    Provider("cpu_conv1", "cpu", False, recompute="conv1"))}
#: Every provider name ``--backends`` accepts (besides backends registered at run time).
PROVIDER_NAMES = tuple(_PROVIDERS)


def make_provider(name: str) -> Provider:
    """The provider called ``name``: one of :data:`PROVIDER_NAMES`, or a fusedres backend
    registered at run time (channels_last).

    Raises:
        ValueError: for any other name.
    """
    if name in _PROVIDERS:
        return _PROVIDERS[name]
    try:
        fusedres.get_backend(name)
    except ValueError:
        raise ValueError(f"unknown provider {name!r}: choose from "
                         f"{', '.join(PROVIDER_NAMES)}") from None
    except RuntimeError:  # a backend name this installation did not register: reported later
        pass
    return Provider(name, name, True)


def provider_status(provider: Provider, device: torch.device, mode: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None) -> tuple[bool, str]:
    """(usable on ``device``, in ``mode`` and ``dtype`` when given; why or why not)."""
    if provider.onnx:
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime")
                   if importlib.util.find_spec(m) is None]
        if missing:
            return False, f"needs {', '.join(missing)} (pip install 'fusedres[export]')"
        if device.type != "cpu":
            return False, "runs onnxruntime's CPUExecutionProvider: CPU only"
        if mode == "train":
            return False, "inference only"
        if dtype not in (None, torch.float32):
            return False, ("float32 only: onnxruntime's CPU execution provider has no "
                           "bfloat16 or float16 convolution")
        return True, "onnxruntime on the exported eager model"
    if provider.compiled:
        if device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
            return False, "torch.compile on CPU needs a C++ compiler (none found)"
        return True, "torch.compile (inductor" + (", freezing)" if mode == "eval" else ")")
    if provider.backend == "eager":
        return True, "plain PyTorch"
    if provider.recompute is not None and mode == "eval":
        return False, "a training recomputation mode: eval runs the same path as the default"
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
    """Every provider for the device (unusable ones are reported with the reason, not run).

    On a GPU torch.compile is left out (its compiles cost minutes: ask for ``compile``), and
    onnxruntime and ``cpu_cl`` with it.
    """
    if device.type == "cuda":
        return ["eager", "eager_cl", "cpu", "triton", "cuda"]
    return list(PROVIDER_NAMES)


def _cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> tuple[bool, str]:
    """(the CPU has bf16 matrix instructions, which): AMX-BF16 or AVX512-BF16.

    Without them oneDNN runs no bf16 convolution: eager's fall back to ATen's generic code, the
    cpu backend's run in float32 (csrc/cpu/conv_precision.h), and bf16 autocast measures that,
    not the memory-bound regime docs/design.md's "CPU as a stand-in for the GPU" is about.
    """
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in _cpu_flags()]
    return (True, "+".join(found)) if found else (
        False, "neither amx_bf16 nor avx512_bf16 among the CPU flags")


def build_model(arch: str, provider: Provider, device: torch.device,
                base: Optional[nn.Module] = None) -> nn.Module:
    """A ResNet for ``provider`` on ``device``.

    Args:
        arch: a builder name in fusedres.models (``resnet18``, ``resnet50``, ...).
        provider: plain PyTorch modules for eager providers, else fused by its backend;
            torch.compile'd (static shapes) for ``compile``: the plain module is then
            ``model._orig_mod``, and inductor compiles at the first call.
        base: a model whose weights to copy (so every provider runs the same network); a fresh
            fusedres.models one when None.
    """
    model = copy.deepcopy(base) if base is not None else getattr(fusedres.models, arch)()
    if provider.backend == "eager":
        model = fusedres.to_eager(model)
    else:
        model = fusedres.convert(model, provider.backend)
        if provider.recompute is not None:
            for block in model.modules():
                if isinstance(block, (fusedres.FusedBasicBlock, fusedres.FusedBottleneck)):
                    block.recompute = provider.recompute
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


def time_interleaved(fns: dict, rounds: int, warmup: int, device: torch.device,
                     calls: int = 1, host: bool = False) -> dict:
    """Seconds per call of each function in ``fns``, measured round by round.

    After ``warmup`` untimed calls of each, every round calls each function once (``calls``
    times in a row, timed together), starting one function later than the round before, so a
    slow spell of a shared machine falls on all of them and none always follows the same
    neighbour.

    Args:
        fns: ``{key: function}``.
        calls: calls per timed stretch; the time is divided by it (a round of many short
            kernels with one synchronisation measures launches, not the synchronisation).
        host: time the host only: synchronise before the stretch, not inside it (a GPU
            launch's enqueue cost).

    Returns:
        ``{key: [seconds per call, one per round]}``.
    """
    keys = list(fns)
    for fn in fns.values():
        for _ in range(warmup * calls):
            fn()
        sync(device)
    times = {key: [] for key in keys}
    for r in range(rounds):
        shift = r % len(keys) if keys else 0
        for key in keys[shift:] + keys[:shift]:
            fn = fns[key]
            if host:
                sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            if not host:
                sync(device)
            times[key].append((time.perf_counter() - t0) / calls)
    return times


def summarize(seconds: list) -> dict:
    """Median, quartiles, extremes and spread of per-round seconds.

    Returns:
        ``{"median_s", "q1_s", "q3_s", "min_s", "max_s", "spread", "rounds"}``: quartiles by
        linear interpolation between the sorted values, ``spread`` the interquartile range over
        the median (0.05 = 5%).
    """
    s = sorted(seconds)
    median = statistics.median(s)
    q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else s * 3
    return {"median_s": median, "q1_s": q1, "q3_s": q3, "min_s": s[0], "max_s": s[-1],
            "spread": (q3 - q1) / median if median > 0 else 0.0, "rounds": len(s)}


def compare(base: dict, other: dict) -> dict:
    """How much faster ``other`` ran than ``base`` (both :func:`summarize` dicts).

    Returns:
        ``{"ratio", "lo", "hi", "result"}``: ``ratio`` = base median / other median (> 1:
        ``other`` is faster); ``lo``..``hi`` the ratios the two interquartile intervals allow;
        ``result`` False where the intervals overlap (the difference is within the spread) or
        either side has fewer than :data:`MIN_ROUNDS_FOR_A_RESULT` rounds: the ratio is then
        not a result.
    """
    enough = min(base["rounds"], other["rounds"]) >= MIN_ROUNDS_FOR_A_RESULT
    apart = base["q3_s"] < other["q1_s"] or other["q3_s"] < base["q1_s"]
    return {"ratio": base["median_s"] / other["median_s"],
            "lo": base["q1_s"] / other["q3_s"], "hi": base["q3_s"] / other["q1_s"],
            "result": enough and apart}


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


# libkineto's log lines ("USDT:2026-12-02 07:25:15 29251:29251 SyncActivityProfilerHandler.cpp:52]
# profiler_start"): written to file descriptor 2 by its own logger, which KINETO_LOG_LEVEL does
# not silence (seen with torch 2.13).
_PROFILER_LINE = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+:\d+\]")


@contextlib.contextmanager
def _without_profiler_lines():
    """Drops libkineto's lines from stderr while the block runs and passes every other line on
    when it ends (Python warnings, errors of the measured code)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(True)
                    if not _PROFILER_LINE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def cpu_peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory that a call of ``fn`` allocates beyond what was live
    before it.

    Runs ``fn`` under ``torch.profiler.profile(profile_memory=True)`` (its log lines kept off
    stderr): c10's CPU allocator then reports every allocation and free with its running total
    of the bytes allocated while profiling, tensors that ops allocate inside their kernels
    (workspaces) included. The peak is the largest running total minus the total before the
    first allocation. The allocator does not report the free of a block it allocated while no
    profiler ran, so freeing such memory does not lower the total: the figure can only err
    high, by such memory. Memory that a library allocates with its own allocator (oneDNN's
    scratchpads) is not seen: it is the same for every provider's convolutions.

    Args:
        fn: the call to measure, e.g. a training step.

    Returns:
        Bytes, 0 when ``fn`` allocates nothing.
    """
    from torch.profiler import ProfilerActivity, profile

    # acc_events: one cycle either way, but torch 2.11 and 2.12 warn on every profile started
    # without it ("Profiler clears events at the end of each cycle"), which the main job printed.
    with _without_profiler_lines(), profile(activities=[ProfilerActivity.CPU],
                                            profile_memory=True, acc_events=True) as prof:
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


# glibc malloc serves big blocks (a [8, 256, 56, 56] activation is 25 MB) with mmap and unmaps them
# on free, so every op that allocates its outputs pays first-touch page faults again each call
# (measured here: ~6200 faults, ~30 ms, for two 12.8 MB outputs, ten times the kernel). That is
# allocator policy, not kernel work, and it hits providers by accident of heap state.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_tuned = False


def keep_freed_memory() -> bool:
    """Tells glibc to keep freed memory in the heap (no mmap for blocks below 1 GiB, no trim),
    what jemalloc and tcmalloc (PyTorch's CPU tuning guide recommends them) do anyway, so that
    every provider measures its kernels rather than page faults. Process-wide: the main job and
    the benchmarks call it before timing. ``FUSEDRES_BENCH_GLIBC_DEFAULTS=1`` opts out.

    Returns:
        Whether glibc took the settings (False elsewhere: not Linux, musl, opted out).
    """
    global _malloc_tuned
    opted_out = os.environ.get("FUSEDRES_BENCH_GLIBC_DEFAULTS") == "1"
    if not sys.platform.startswith("linux") or opted_out:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
                         and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _malloc_tuned


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
    """One inference forward (eval mode, under no_grad: inductor's freezing needs it).
    x: [N, 3, H, W]."""
    model.eval()

    def step():
        with torch.no_grad(), autocast(x.device, dtype):
            return model(x)

    return step


def make_onnx_step(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """onnxruntime on ``model`` (plain torch.nn, eval mode) exported to ONNX at x's shape.

    The session gets as many threads as torch, and its threads do not spin after a run
    (onnxruntime's default): spinning threads would take the cores from the provider that
    runs next in the round.

    Returns:
        A function returning the logits of ``x`` as a tensor.
    """
    import onnxruntime as ort

    model.eval()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        # The exporter's progress lines, its logged notes about torchvision ops and pytree's
        # deprecation warnings say nothing about this model.
        exporter_log = logging.getLogger("torch.onnx")
        level = exporter_log.level
        exporter_log.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(None), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), path, input_names=["images"],
                                  output_names=["logits"], verbose=False)
        finally:
            exporter_log.setLevel(level)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {"images": x.detach().cpu().contiguous().numpy()}

    def step():
        return torch.from_numpy(session.run(None, feed)[0])

    return step


# -- one comparison ------------------------------------------------------------------------------

def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def make_base(arch: str, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """``fusedres.models.<arch>()`` (eager backend) with random BatchNorm affine parameters and
    running statistics calibrated on ``x``.

    Fresh BatchNorm (gamma 1, beta 0, mean 0, var 1) would let a fold that drops a shift or a
    statistic pass the eval check; statistics from real activations keep eval's outputs at a
    sane scale through 50 layers.
    """
    torch.manual_seed(seed)
    model = getattr(fusedres.models, arch)(backend="eager").to(x.device)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        model.train()
        for i in range(2):
            model(x + 0.1 * i)
        for bn in bns:
            bn.momentum = 0.1
    return model


class ModelGroup:
    """One comparison: an architecture in one mode and dtype, every provider on the same weights
    and the same input.

    ``prepare()`` builds and first-calls every provider (untimed: compiles, exports), ``check()``
    compares their outputs with eager and a float64 oracle, ``time()`` times them round by
    round, ``memory()`` measures one provider's training memory. The main job and
    benchmarks/test_bench_models.py run the same groups.

    Args:
        arch: a fusedres.models builder name.
        mode: ``"train"`` (forward, cross-entropy, backward, SGD step) or ``"eval"`` (forward).
        dtype: float32, or a 16-bit dtype for autocast.
        base: the weights every provider copies (:func:`make_base`).
        x: the input [N, 3, H, W] on the device (NCHW; each provider gets its layout).
        providers: usable providers (see :func:`provider_status`).
    """

    def __init__(self, arch: str, mode: str, dtype: torch.dtype, base: nn.Module,
                 x: torch.Tensor, providers: list):
        self.arch, self.mode, self.dtype, self.base, self.x = arch, mode, dtype, base, x
        self.device = x.device
        self.providers = {p.name: p for p in providers}
        gen = torch.Generator().manual_seed(1)
        self.target = torch.randint(0, 1000, (x.shape[0],), generator=gen).to(self.device)
        self.gy = torch.randn(x.shape[0], 1000, generator=gen).to(self.device)
        #: {name: (the plain module or None, what is called: module or its compiled wrapper)}
        self.models: dict = {}
        self.steps: dict = {}
        self.first_call_s: dict = {}
        self.checks: dict = {}
        #: {name: the first line of the error} of providers that raised (dropped from the group)
        self.failed: dict = {}

    def prepare(self, log: Callable[[str], None] = lambda msg: None) -> None:
        """Builds every provider and calls it once, untimed (compiles, exports).

        A training step's first call is undone: weights, statistics and the optimizer's momentum
        return to the base's, so that ``check`` compares equal weights. A provider that raises
        is dropped from the group, its error kept in ``failed``: the others are still measured.
        """
        if any(p.compiled for p in self.providers.values()):
            # Every group compiles the same ResNet.forward again: without a reset dynamo's
            # recompile limit (8) would run later groups eagerly.
            torch._dynamo.reset()
        for name, p in list(self.providers.items()):
            t0 = time.perf_counter()
            try:
                self._prepare_one(name, p)
            except Exception as e:  # noqa: BLE001 (reported; the other providers go on)
                self._fail(name, e, log)
                continue
            sync(self.device)
            self.first_call_s[name] = time.perf_counter() - t0  # a compile or export included
            if p.compiled:
                log(f"  {name}: compiled in {self.first_call_s[name]:.1f} s")

    def _fail(self, name: str, error: Exception, log: Callable[[str], None]) -> None:
        self.failed[name] = f"{type(error).__name__}: {error}".splitlines()[0]
        for table in (self.providers, self.models, self.steps, self.first_call_s):
            table.pop(name, None)
        log(f"  {name} FAILED: {self.failed[name]}")

    def _prepare_one(self, name: str, p: Provider) -> None:
        if p.onnx:
            eager = build_model(self.arch, p, self.device, self.base)
            self.models[name] = (None, None)
            self.steps[name] = make_onnx_step(eager, as_input(self.x, p))
            return
        called = build_model(self.arch, p, self.device, self.base)
        module = getattr(called, "_orig_mod", called)
        xin = as_input(self.x, p)
        self.models[name] = (module, called)
        if self.mode == "train":
            state = {k: v.clone() for k, v in module.state_dict().items()}
            make_train_step(called, xin, self.target, self.dtype)()
            module.load_state_dict(state)  # in place: compiled graphs keep their tensors
            self.steps[name] = make_train_step(called, xin, self.target, self.dtype)
        else:
            self.steps[name] = make_eval_step(called, xin, self.dtype)
            # Freezing is read when inductor compiles, at this first call.
            with (torch._inductor.config.patch(freezing=True) if p.compiled
                  else contextlib.nullcontext()):
                self.steps[name]()

    def _outputs(self, name: str, model: Optional[nn.Module] = None, x=None, gy=None,
                 dtype=None) -> dict:
        """Logits (and in training GRAD_NAMES gradients of ``gy``) of a provider's model, or
        of ``model`` on ``x`` in ``dtype``."""
        if model is None:
            module, called = self.models[name]
            p = self.providers[name]
            if p.onnx:
                return {"logits": self.steps[name]()}
            x, gy, dtype = as_input(self.x, p), self.gy, self.dtype
        else:
            module = called = model.train(self.mode == "train")
        if self.mode == "eval":
            with torch.no_grad(), autocast(self.device, dtype):
                return {"logits": called(x).float()}
        with autocast(self.device, dtype):
            out = called(x)
        out.backward(gy.to(out.dtype))
        params = dict(module.named_parameters())
        got = {"logits": out.detach().float(), **{n: params[n].grad.clone() for n in GRAD_NAMES}}
        module.zero_grad(set_to_none=True)
        return got

    def check(self, log: Callable[[str], None] = lambda msg: None) -> dict:
        """Every provider's outputs against eager in the same dtype and a float64 oracle.

        Eager (NCHW) and the oracle are built afresh from the base; the providers run their
        prepared models. On the CPU everything runs inside reference.oracle_convolutions
        (ATen's native convolutions: oneDNN's backward disagrees with float64), except what
        calls oneDNN directly (inductor's frozen convolutions, onnxruntime), whose forward
        agrees with float64.

        Returns:
            ``{name: {"ok", "worst", "tensors": {tensor: {"max_abs", "max_rel", "rel_l2",
            "rel_l2_eager", "bound", "ok"}}}}``: max_abs/max_rel against eager in the same dtype
            (max_rel = max_abs / max |eager|), rel_l2 of each against the oracle; ok when
            rel_l2 <= bound = 2 * rel_l2_eager + ATOL[dtype]; ``worst`` the tensor nearest its
            bound. A provider that raises is dropped, as in ``prepare``.
        """
        eager_p = make_provider("eager")
        with reference.oracle_convolutions(self.device):
            ref = self._outputs("", build_model(self.arch, eager_p, self.device, self.base),
                                self.x, self.gy, self.dtype)
            exact = self._outputs("", reference.upcast(build_model(
                self.arch, eager_p, self.device, self.base)), self.x.double(), self.gy.double(),
                torch.float64)
            got_all = {}
            for name in list(self.providers):
                try:
                    got_all[name] = self._outputs(name)
                except Exception as e:  # noqa: BLE001 (reported; the other providers go on)
                    self._fail(name, e, log)
        for name, got in got_all.items():
            tensors = {}
            for t in got:
                diff = (got[t].double() - ref[t].double()).abs().max().item()
                scale = ref[t].double().abs().max().item()
                e_own, e_eager = _rel_l2(got[t], exact[t]), _rel_l2(ref[t], exact[t])
                bound = 2 * e_eager + ATOL[self.dtype]
                tensors[t] = {"max_abs": diff, "max_rel": diff / scale if scale > 0 else diff,
                              "rel_l2": e_own, "rel_l2_eager": e_eager, "bound": bound,
                              "ok": e_own <= bound}
            worst = max(tensors, key=lambda t: tensors[t]["rel_l2"] / tensors[t]["bound"])
            self.checks[name] = {"ok": all(e["ok"] for e in tensors.values()), "worst": worst,
                                 "tensors": tensors}
        return self.checks

    def time(self, rounds: int, warmup: int) -> dict:
        """:func:`time_interleaved` of every provider's step: ``{name: [seconds per round]}``."""
        return time_interleaved(self.steps, rounds, warmup, self.device)

    def memory(self, name: str) -> tuple:
        """(peak bytes of a step, bytes a training forward saves for backward), measured after
        the timing; None where not measurable: onnxruntime's memory (torch's allocator does not
        see it), the saved tensors of compiled graphs (hidden from the hooks) and of eval."""
        module, called = self.models[name]
        p = self.providers[name]
        if p.onnx:
            return None, None
        peak = peak_memory(self.steps[name], self.device)
        if p.compiled or self.mode != "train":
            return peak, None
        xin = as_input(self.x, self.providers[name])

        def fwd():
            with autocast(self.device, self.dtype):
                called(xin)

        return peak, saved_bytes(fwd, exclude=tuple(module.parameters()))


def largest_batch(arch: str, provider: Provider, device: torch.device, dtype: torch.dtype,
                  image_size: int, budget_bytes: int, probes: tuple = (2, 8)) -> dict:
    """The largest batch whose training step fits in ``budget_bytes`` of activation memory.

    The step's peak (:func:`peak_memory`: activations, gradients and workspaces, not weights
    or optimizer state) grows linearly with the batch: measured at the two ``probes`` batches,
    the line predicts the largest batch within the budget, whose step is then measured; while
    that exceeds the budget the batch is lowered by one image's share. A figure to act on:
    e.g. how much larger a batch the block-level op's leaner saved activations allow.

    Args:
        arch: a builder name in fusedres.models; provider: a training provider.
        image_size: the input [batch, 3, image_size, image_size].
        budget_bytes: the memory the step's peak may take.
        probes: two batch sizes for the fit.

    Returns:
        ``{"batch", "peak_bytes"}`` at the largest batch (batch 0 when even one image does not
        fit), plus ``"bytes_per_image"`` and ``"fixed_bytes"`` of the fit.
    """
    model = build_model(arch, provider, device)

    def peak(batch: int) -> int:
        g = torch.Generator().manual_seed(batch)
        x = as_input(torch.randn(batch, 3, image_size, image_size, generator=g).to(device),
                     provider)
        target = torch.randint(0, 1000, (batch,), generator=g).to(device)
        step = make_train_step(model, x, target, dtype)
        step()  # the first step allocates the gradients, which later steps reuse or free
        return peak_memory(step, device)

    (b1, b2), (p1, p2) = probes, [peak(b) for b in probes]
    per_image = max(1.0, (p2 - p1) / (b2 - b1))
    fixed = p1 - b1 * per_image
    batch = max(0, int((budget_bytes - fixed) // per_image))
    measured = peak(batch) if batch > 0 else 0
    while batch > 0 and measured > budget_bytes:
        batch = max(0, batch - max(1, math.ceil((measured - budget_bytes) / per_image)))
        measured = peak(batch) if batch > 0 else 0
    return {"batch": batch, "peak_bytes": measured, "bytes_per_image": per_image,
            "fixed_bytes": fixed}


def check_against_eager(arch: str, providers: list, device: torch.device, dtype: torch.dtype,
                        batch: int, image_size: int, mode: str = "train", seed: int = 0) -> dict:
    """:meth:`ModelGroup.check` of ``providers`` on a fresh group (no timing).

    Args:
        batch, image_size: the input [batch, 3, image_size, image_size].
    """
    x = torch.randn(batch, 3, image_size, image_size,
                    generator=torch.Generator().manual_seed(seed)).to(device)
    group = ModelGroup(arch, mode, dtype, make_base(arch, x, seed), x, providers)
    group.prepare()
    return group.check()


# -- the job ------------------------------------------------------------------------------------

class NothingToRun(RuntimeError):
    """None of the requested providers is usable on this machine."""


@dataclass
class Config:
    """Settings of one run; :func:`default_config` fills them per device."""

    device: str
    archs: list
    dtypes: list
    batch: int
    image_size: int
    rounds: int
    warmup: int
    modes: list = field(default_factory=lambda: list(MODES))
    backends: list = field(default_factory=list)
    out: str = "fusedres_results"


def default_config(device: str) -> Config:
    """CPU: resnet50, batch 8 at 112x112, float32 plus bfloat16 where the CPU has native bf16
    matrix instructions (the whole job in a few minutes on 2 cores, most of them torch.compile's
    compiles); GPU: batch 256 at 224x224 in bfloat16."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return Config(device, ["resnet50"], ["bfloat16"], batch=256, image_size=224, rounds=20,
                      warmup=5, backends=default_providers(dev))
    dtypes = ["float32"] + (["bfloat16"] if native_bf16()[0] else [])
    return Config(device, ["resnet50"], dtypes, batch=8, image_size=112, rounds=7, warmup=1,
                  backends=default_providers(dev))


def _version(module: str) -> Optional[str]:
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(__import__(module), "__version__", "?")


def machine_info(device: torch.device) -> dict:
    """Device name, CPU model, load, software versions and the date: what a result must carry."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host_platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "fusedres": fusedres.__version__,
            "triton": _version("triton"), "onnxruntime": _version("onnxruntime"),
            "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "native_bf16": native_bf16()[1],
            "native_bf16_found": native_bf16()[0],
            "device": device.type,
            "malloc_keeps_freed_memory": _malloc_tuned,
            "cpu_kernels": _cpu_kernel_build(),
            # Other processes' load when the job started (timings on a shared machine need it).
            "load_average": list(os.getloadavg())}
    info["device_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                           else info["cpu_model"])
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _cpu_kernel_build() -> Optional[str]:
    """The build of fusedres's C++ CPU kernels in use ("AVX512", "AVX2", "DEFAULT"; docs/design.md
    section 4), or None without the extension."""
    if _ext._C is None:
        return None
    return _ext._C.build_info().split("cpu kernels in use: ", 1)[1].split(" ", 1)[0]


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


def _header(m: dict) -> str:
    """One line: device, CPU model, cores, load, versions."""
    load = "/".join(f"{v:.2f}" for v in m["load_average"])
    dev = f"{m['device_name']}, host CPU " if m["device"] == "cuda" else ""
    return (f"{dev}{m['cpu_model']} ({m['cpu_count']} cores, {m['torch_threads']} torch "
            f"threads, load average {load} over 1/5/15 min, bf16 matrix instructions: "
            f"{m['native_bf16']}); torch {m['torch']}, triton {m['triton'] or '-'}, "
            f"onnxruntime {m['onnxruntime'] or '-'}, fusedres {m['fusedres']} (CPU kernels "
            f"{m.get('cpu_kernels') or '-'})")


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


def _traffic(arch: str, backend: str, batch: int, size: int, training: bool,
             dtype: torch.dtype) -> Optional[int]:
    """fusedres.traffic's bytes for the model (None where the model does not describe it)."""
    if backend not in traffic.FUSIONS:
        return None
    try:
        return traffic.model_traffic(arch, batch, size, backend, training,
                                     torch.empty((), dtype=dtype).element_size()).total
    except ValueError:  # an architecture the traffic model does not enumerate
        return None


def _baseline(rows: list) -> Optional[dict]:
    """The faster (by median) of the group's ``eager`` and ``eager_cl`` rows."""
    eager = [r for r in rows if r["provider"] in ("eager", "eager_cl")]
    return min(eager, key=lambda r: r["median_s"]) if eager else None


def _run_group(cfg: Config, arch: str, dtype_name: str, mode: str, base: nn.Module,
               x: torch.Tensor, providers: list, log) -> dict:
    dtype = DTYPES[dtype_name]
    label = f"{arch} {dtype_name} {mode}"
    usable, skipped = [], []
    for p in providers:
        ok, why = provider_status(p, x.device, mode, dtype)
        (usable if ok else skipped).append(p if ok else {"provider": p.name, "reason": why})
    group = ModelGroup(arch, mode, dtype, base, x, usable)
    log(f"{label}: first calls of {', '.join(p.name for p in usable)}, untimed"
        + ("; torch.compile compiles" if any(p.compiled for p in usable) else "")
        + ("; onnxruntime's provider exports" if any(p.onnx for p in usable) else ""))
    group.prepare(log)
    log(f"{label}: checking against eager and a float64 oracle")
    for name, chk in group.check(log).items():
        e = chk["tensors"][chk["worst"]]
        log(f"  {name} {'ok' if chk['ok'] else 'FAIL'}: nearest its bound {chk['worst']}, "
            f"rel-L2 vs fp64 {e['rel_l2']:.2e} (eager {e['rel_l2_eager']:.2e}, bound "
            f"{e['bound']:.2e}), max rel vs eager {e['max_rel']:.2e}")
    log(f"{label}: timing {cfg.rounds} rounds after {cfg.warmup} warm-up, providers in turn")
    times = group.time(cfg.rounds, cfg.warmup)
    rows = []
    for name, p in group.providers.items():
        stats = summarize(times[name])
        peak, saved = group.memory(name)
        rows.append({"provider": name, "backend": p.backend, "channels_last": p.channels_last,
                     "compiled": p.compiled, "onnx": p.onnx, "times_s": times[name], **stats,
                     "images_per_s": cfg.batch / stats["median_s"],
                     "first_call_s": group.first_call_s[name], "check": group.checks[name],
                     "peak_allocated_bytes": peak, "saved_activation_bytes": saved,
                     "traffic_bytes": None if (p.compiled or p.onnx) else _traffic(
                         arch, p.backend, cfg.batch, cfg.image_size, mode == "train", dtype)})
    base_row = _baseline(rows)
    compiled = next((r for r in rows if r["compiled"]), None)
    for r in rows:
        for key, ref in (("vs_eager", base_row), ("vs_compile", compiled)):
            r[key] = compare(ref, r) if ref is not None and ref is not r else None
        eager_traffic = base_row and base_row["traffic_bytes"]
        r["traffic_ratio"] = (eager_traffic / r["traffic_bytes"]
                              if eager_traffic and r["traffic_bytes"] else None)
    return {"arch": arch, "dtype": dtype_name, "mode": mode, "batch": cfg.batch,
            "image_size": cfg.image_size, "rounds": cfg.rounds, "warmup": cfg.warmup,
            "load_average_1min": os.getloadavg()[0],
            "baseline": base_row["provider"] if base_row else None,
            "compile": compiled["provider"] if compiled else None,
            "results": rows, "skipped": skipped + [
                {"provider": name, "reason": err, "failed": True}
                for name, err in group.failed.items()]}


def run(cfg: Config, quiet: bool = False) -> dict:
    """Runs the job for ``cfg`` and returns the report (also written to ``cfg.out``)."""
    log = _Progress(quiet)
    device = torch.device(cfg.device)
    report = {"machine": machine_info(device), "config": asdict(cfg),
              "backends": {k: list(v) for k, v in fusedres.available_backends().items()},
              "groups": [], "skipped": []}
    log(_header(report["machine"]))
    log(f"{', '.join(cfg.archs)}: batch {cfg.batch}, {cfg.image_size}x{cfg.image_size}; "
        f"{', '.join(cfg.dtypes)}; {', '.join(cfg.modes)}")
    providers = []
    for name in cfg.backends:
        p = make_provider(name)
        ok, why = provider_status(p, device)
        if ok:
            providers.append(p)
        else:
            report["skipped"].append({"provider": name, "reason": why})
            log(f"skip {name}: {why}")
    if not providers:
        raise NothingToRun("none of the providers is usable here: " + "; ".join(
            f"{s['provider']}: {s['reason']}" for s in report["skipped"]))
    for arch in cfg.archs:
        x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size,
                        generator=torch.Generator().manual_seed(0)).to(device)
        base = make_base(arch, x)
        for dtype_name in cfg.dtypes:
            for mode in cfg.modes:
                report["groups"].append(_run_group(cfg, arch, dtype_name, mode, base, x,
                                                   providers, log))
                _dump(report, cfg.out)  # a run cut short (a timeout) keeps what it measured
    report["warnings"] = warnings_of(report)
    report["targets"] = model_targets(report)
    report["elapsed_s"] = time.perf_counter() - log.t0
    write(report, cfg.out, log)
    if not quiet:
        print(format_table(report), flush=True)
    return report


# -- reading the results -------------------------------------------------------------------------

#: Issue 13's targets for a fused provider's whole-model speedup over eager (the faster eager
#: layout), per (dtype, mode); in float32 it must also be ahead of torch.compile.
MODEL_TARGETS = {("float32", "train"): 1.10, ("float32", "eval"): 1.5,
                 ("bfloat16", "train"): 1.2, ("bfloat16", "eval"): 1.5}


def _fmt_ratio(c: Optional[dict]) -> str:
    """``1.12x [1.05-1.19]``, `` ?`` appended where it is not a result; ``-`` for None."""
    if c is None:
        return "-"
    return f"{c['ratio']:.2f}x [{c['lo']:.2f}-{c['hi']:.2f}]" + ("" if c["result"] else " ?")


def warnings_of(report: dict) -> list:
    """One line per group whose ratios are not results (see :func:`compare`)."""
    lines = []
    for g in report["groups"]:
        weak = [f"{r['provider']} vs {g[ref]} {_fmt_ratio(r[key])}"
                for r in g["results"] for key, ref in (("vs_eager", "baseline"),
                                                       ("vs_compile", "compile"))
                if r[key] is not None and not r[key]["result"]]
        if weak:
            why = (f"fewer than {MIN_ROUNDS_FOR_A_RESULT} rounds" if g["rounds"]
                   < MIN_ROUNDS_FOR_A_RESULT else "the interquartile intervals overlap")
            lines.append(f"{g['arch']} {g['dtype']} {g['mode']}: not a result ({why}; more "
                         f"--rounds or a quieter machine): {', '.join(weak)}")
    return lines


def _target_applies(machine: dict, dtype: str) -> bool:
    # A report written before the key existed is taken as it was read then.
    return dtype != "bfloat16" or machine.get("native_bf16_found", True)


def model_targets(report: dict) -> list:
    """Every fused provider's ratios against :data:`MODEL_TARGETS` (targets for the CPU: none
    on a GPU); nothing is asserted.

    A target is ``met`` when the ratio is a result (:func:`compare`) and its whole
    interquartile range clears it, ``missed`` when it is a result and the whole range falls
    short, else ``unresolved`` (a run of one round is no evidence either way).
    The bfloat16 targets are for CPUs with native bf16 matrix instructions
    (``machine["native_bf16_found"]``, :func:`native_bf16`): elsewhere they are left out.

    Returns:
        Rows ``{"group", "provider", "what", "ratio", "verdict"}``.
    """
    def verdict(c, target):
        if not c["result"]:
            return "unresolved"
        return "met" if c["lo"] >= target else "missed" if c["hi"] < target else "unresolved"

    if report["machine"]["device"] != "cpu":
        return []
    rows = []
    for g in report["groups"]:
        target = MODEL_TARGETS.get((g["dtype"], g["mode"]))
        if target is None or not _target_applies(report["machine"], g["dtype"]):
            continue
        for r in g["results"]:
            if r["backend"] == "eager":
                continue
            label = f"{g['arch']} {g['dtype']} {g['mode']}"
            if r["vs_eager"] is not None:
                rows.append({"group": label, "provider": r["provider"],
                             "what": f"vs eager >= {target}x", "ratio": r["vs_eager"],
                             "verdict": verdict(r["vs_eager"], target)})
            if g["dtype"] == "float32" and r["vs_compile"] is not None:
                rows.append({"group": label, "provider": r["provider"],
                             "what": "vs torch.compile > 1x", "ratio": r["vs_compile"],
                             "verdict": verdict(r["vs_compile"], 1.0 + 1e-9)})
    return rows


def _check_cell(r: dict) -> str:
    return "ok" if r["check"]["ok"] else f"FAIL ({r['check']['worst']})"


def format_group(g: dict, machine: dict) -> str:
    """One group as a Markdown table under a line naming what ran where."""
    train = g["mode"] == "train"
    what = ("training step (forward, backward, SGD)" if train else "eval forward (no_grad)")
    dtype = g["dtype"] + (" autocast" if g["dtype"] != "float32" else "")
    lines = [f"{g['arch']} {dtype} {what}, batch {g['batch']}, {g['image_size']}x"
             f"{g['image_size']}, on {machine['device_name']} (load {g['load_average_1min']:.1f}"
             f" after it): median of {g['rounds']} rounds after {g['warmup']} warm-up; "
             f"vs eager: vs {g['baseline'] or '-'}, the faster eager layout", ""]
    head = ["provider", "median ms", "spread", "images/s", "vs eager", "vs torch.compile"]
    head += ["peak step memory", "saved activations"] if train else []
    lines += ["| " + " | ".join(head + ["first call s", "check"]) + " |",
              "| --- |" + " ---: |" * (len(head) - 1) + " ---: | --- |"]
    for r in g["results"]:
        cells = [r["provider"], f"{r['median_s'] * 1e3:.1f}", f"{r['spread']:.1%}",
                 f"{r['images_per_s']:.1f}",
                 "baseline" if r["provider"] == g["baseline"] else _fmt_ratio(r["vs_eager"]),
                 "baseline" if r["provider"] == g["compile"] else _fmt_ratio(r["vs_compile"])]
        if train:
            cells += [_fmt_bytes(r["peak_allocated_bytes"]),
                      _fmt_bytes(r["saved_activation_bytes"])]
        cells += [f"{r['first_call_s']:.1f}", _check_cell(r)]
        lines.append("| " + " | ".join(cells) + " |")
    for s in g["skipped"]:
        lines.append(f"\n{'FAILED (raised)' if s.get('failed') else 'not run here'}: "
                     f"{s['provider']}: {s['reason']}")
    return "\n".join(lines)


def format_table(report: dict) -> str:
    """The whole report as text: header, one table per group, warnings, targets."""
    m = report["machine"]
    lines = [_header(m), "",
             "spread: interquartile range / median. Ratios: the reference's median / the "
             "provider's (> 1: faster), [the range the two interquartile intervals allow]; "
             "?: the intervals overlap, the ratio is not a result. check: docs/design.md's rule "
             "against eager and a float64 oracle."]
    for g in report["groups"]:
        lines += ["", format_group(g, m)]
    for s in report["skipped"]:
        lines.append(f"\nskipped {s['provider']}: {s['reason']}")
    if report.get("warnings"):
        lines += ["", "WARNING: ratios that are not results:"]
        lines += [f"  {w}" for w in report["warnings"]]
    if report.get("targets"):
        lines += ["", f"targets (issue 13; measured on {m['device_name']}, not asserted; met = "
                      "a result whose whole interquartile range clears it):"]
        lines += [f"  {t['verdict']:10s} {t['group']} {t['provider']} {t['what']}: "
                  f"{_fmt_ratio(t['ratio'])}" for t in report["targets"]]
    if m["device"] == "cpu" and any(not _target_applies(m, g["dtype"]) for g in report["groups"]):
        lines += ["", "no bfloat16 targets here: issue 13 sets them where the CPU has native bf16 "
                      f"matrix instructions ({m['native_bf16']}); eager's bfloat16 convolutions "
                      "run ATen's generic code here, the cpu backend's run in float32"]
    failed = [f"{g['arch']} {g['dtype']} {g['mode']} {r['provider']}"
              for g in report["groups"] for r in g["results"] if not r["check"]["ok"]]
    failed += [f"{g['arch']} {g['dtype']} {g['mode']} {s['provider']} (raised)"
               for g in report["groups"] for s in g["skipped"] if s.get("failed")]
    lines.append("\nerror check: " + ("every provider ok" if not failed
                                      else "FAILED: " + ", ".join(failed)))
    return "\n".join(lines)


def _dump(report: dict, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return path


def write(report: dict, out: str, log: Callable[[str], None]) -> None:
    """Writes report.json and, when matplotlib is importable, report.png into ``out``.

    The chart: one panel per architecture, one cluster of bars per (mode, dtype), a bar per
    provider (legend) showing its speedup over eager, with the interquartile range of the ratio
    as an error bar; a hatched bar is not a result.
    """
    os.makedirs(out, exist_ok=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report["plot"] = None
        log("matplotlib is not installed: writing the JSON only (pip install matplotlib)")
    else:
        report["plot"] = os.path.join(out, "report.png")
        _plot(report, plt).savefig(report["plot"], dpi=110)
        plt.close("all")
    path = _dump(report, out)
    log(f"wrote {path}" + (f" and {report['plot']}" if report.get("plot") else ""))


def _plot(report: dict, plt):
    archs = list(dict.fromkeys(g["arch"] for g in report["groups"]))
    names = list(dict.fromkeys(r["provider"] for g in report["groups"] for r in g["results"]))
    colors = dict(zip(names, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(archs), 1, figsize=(11, 3.8 * len(archs)), squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, arch in zip(axes[:, 0], archs):
        groups = [g for g in report["groups"] if g["arch"] == arch]
        for gi, g in enumerate(groups):
            for r in g["results"]:
                c = r["vs_eager"]
                ratio = 1.0 if r["provider"] == g["baseline"] else c and c["ratio"]
                if ratio is None:
                    continue
                xpos = gi - 0.4 + width * (names.index(r["provider"]) + 0.5)
                err = ([[ratio - c["lo"]], [c["hi"] - ratio]] if c else None)
                # From 1x up or down: the baseline is the axis.
                ax.bar(xpos, ratio - 1.0, width, bottom=1.0, color=colors[r["provider"]],
                       yerr=err, capsize=2, hatch="//" if c and not c["result"] else None,
                       edgecolor="white")
                ax.annotate(f"{ratio:.2f}", (xpos, ratio), ha="center", fontsize=7,
                            va="bottom" if ratio >= 1 else "top")
        # Log scale: 0.5x and 2x lie equally far from 1x.
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{g['mode']} {g['dtype']}\n(baseline: {g['baseline']})"
                            for g in groups])
        ax.set_ylabel("speedup over eager")
        ax.set_title(f"{arch}, batch {groups[0]['batch']}, {groups[0]['image_size']}px", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n in names]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="lightgray", hatch="//",
                                 edgecolor="white"))
    fig.legend(handles, names + ["not a result\n(intervals overlap)"], loc="center right",
               fontsize=8)
    m = report["machine"]
    fig.suptitle(f"Speedup over eager PyTorch (eager median / provider median; bars: "
                 f"interquartile range) on {m['device_name']}, load {m['load_average'][0]:.1f}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.85, 0.95))
    return fig


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


def _case_baselines(provs: dict) -> tuple:
    """(the faster of the group's ``eager`` and ``eager_cl`` cases, its compile case)."""
    eager = [provs[n] for n in ("eager", "eager_cl") if n in provs]
    return (min(eager, key=lambda c: c["stats"]["median_s"]) if eager else None,
            next((c for c in provs.values() if c["extra_info"].get("compiled")), None))


def _num(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_bench_cases(cases: list) -> str:
    """Benchmark cases as one small table per group, then the groups whose ratios are not
    results.

    Columns: provider, median ms per call, spread (interquartile range / median), GB/s (the
    case's byte count over the median), images/s, ratio to eager (the faster of ``eager`` and
    ``eager_cl``) and to torch.compile with the range their interquartile intervals allow (``?``
    where they overlap: not a result, see :func:`compare`), ``traffic_ratio_vs_eager`` (bytes
    the eager sequence moves / bytes this provider moves, by :mod:`fusedres.traffic`) and the
    error check where the case ran one. "-" where not measured.

    Args:
        cases: dicts ``{"group", "name", "stats", "extra_info"}``, ``stats`` from
            :func:`summarize`, ``extra_info["provider"]``, as benchmarks/conftest.py logs each.
    """
    lines, weak = [], []
    for group, provs in _groups(cases).items():
        eager, compiled = _case_baselines(provs)
        lines += [group, f"  {'provider':11s} {'median ms':>10s} {'spread':>7s} {'GB/s':>8s} "
                         f"{'images/s':>9s} {'vs eager':>20s} {'vs torch.compile':>20s} "
                         f"{'bytes eager/own':>15s} check"]
        for name, case in provs.items():
            info, stats = case["extra_info"], case["stats"]
            ratios = [("baseline" if ref is case else
                       _fmt_ratio(compare(ref["stats"], stats)) if ref else "-")
                      for ref in (eager, compiled)]
            if any(r.endswith("?") for r in ratios):
                weak.append(f"{group}: {name}")
            check = info.get("check")
            lines.append(f"  {name:11s} {stats['median_s'] * 1e3:10.4g} {stats['spread']:7.1%} "
                         f"{_num(info.get('GB/s'), '.1f'):>8s} "
                         f"{_num(info.get('images/s'), '.1f'):>9s} {ratios[0]:>20s} "
                         f"{ratios[1]:>20s} {_num(info.get('traffic_ratio_vs_eager'), '.2f'):>15s}"
                         f" {'-' if check is None else check}")
    if weak:
        lines += ["", f"not results ({len(weak)}: the interquartile intervals overlap, or fewer "
                      f"than {MIN_ROUNDS_FOR_A_RESULT} rounds; more rounds or a quieter machine):"]
        lines += [f"  {w}" for w in weak]
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
                eager, compiled = _case_baselines(provs)
                vs = {key: ref["stats"]["median_s"] / case["stats"]["median_s"] if ref else None
                      for key, ref in (("eager", eager), ("compile", compiled))}
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


# -- command line --------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device (cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text!r}: torch sees no CUDA device")
    return device


def _names(text: str, allowed, what: str) -> list:
    """A comma-separated list, every name checked against ``allowed`` (a collection or a
    function that raises ValueError)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"{what} is empty")
    for n in names:
        if callable(allowed):
            try:
                allowed(n)
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None
        elif n not in allowed:
            raise ValueError(f"unknown {what} value {n!r}: choose from {', '.join(allowed)}")
    return names


def _parser(defaults: Config) -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m fusedres", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                 description="Check the fused backends, eager PyTorch, torch.compile and "
                             "onnxruntime against eager and a float64 oracle on ResNets, time "
                             "them round by round, and write report.json and report.png.")
    ap.add_argument("--device", default=defaults.device, help="cpu or cuda[:i]")
    ap.add_argument("--arch", default=",".join(defaults.archs),
                    help="comma-separated: " + ", ".join(fusedres.models.ARCHITECTURES))
    ap.add_argument("--batch", type=int, default=defaults.batch, help="images per step")
    ap.add_argument("--image-size", type=int, default=defaults.image_size,
                    help=f"height and width, at least {MIN_CHECK_IMAGE}")
    ap.add_argument("--dtype", default=",".join(defaults.dtypes),
                    help="comma-separated: float32, bfloat16 or float16 (autocast); the default "
                         "adds bfloat16 to float32 where the CPU has native bf16 matrix "
                         f"instructions (here: {native_bf16()[1]}); bfloat16 on a GPU")
    ap.add_argument("--modes", default=",".join(defaults.modes),
                    help="comma-separated: train (forward, backward, SGD) and eval (forward)")
    ap.add_argument("--rounds", "--steps", type=int, default=defaults.rounds,
                    help="timed rounds; each calls every provider once")
    ap.add_argument("--warmup", type=int, default=defaults.warmup,
                    help="untimed calls of each provider before the rounds (after its first call, "
                         "which compiles or exports)")
    ap.add_argument("--backends", default=",".join(defaults.backends),
                    help="comma-separated providers: " + ", ".join(PROVIDER_NAMES)
                         + " (unusable ones are skipped with the reason; on a GPU the default "
                           "leaves out compile)")
    ap.add_argument("--out", default=defaults.out, help="results folder")
    return ap


def parse_args(argv: Optional[list] = None) -> Config:
    """The Config of a command line; a bad value exits with status 2 and a one-line error."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default=None)
    known, _ = pre.parse_known_args(argv)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    ap = _parser(default_config(default_device))
    try:
        device = _device(known.device or default_device)
    except ValueError as e:
        ap.error(str(e))
    ap = _parser(default_config(str(device)))
    a = ap.parse_args(argv)
    try:
        cfg = Config(str(device), _names(a.arch, fusedres.models.ARCHITECTURES, "--arch"),
                     [str(DTYPES[d]).removeprefix("torch.")
                      for d in _names(a.dtype, list(DTYPES), "--dtype")],
                     a.batch, a.image_size, a.rounds, a.warmup,
                     modes=_names(a.modes, MODES, "--modes"),
                     backends=_names(a.backends, make_provider, "--backends"), out=a.out)
    except ValueError as e:
        ap.error(str(e))
    if cfg.batch < 1 or cfg.rounds < 1 or cfg.warmup < 0:
        ap.error("--batch and --rounds must be at least 1, --warmup at least 0")
    if cfg.image_size < MIN_CHECK_IMAGE:
        ap.error(f"--image-size must be at least {MIN_CHECK_IMAGE}: below it ResNet's last stage "
                 "is 1x1 and the error check is ill-conditioned")
    cfg.dtypes = list(dict.fromkeys(cfg.dtypes))
    return cfg


def main(argv: Optional[list] = None) -> int:
    """Entry point of ``python -m fusedres``: 0, 1 when a fusedres provider fails its check or
    raises, 2 for a bad argument or when no provider is usable."""
    cfg = parse_args(argv)
    keep_freed_memory()
    try:
        report = run(cfg)
    except NothingToRun as e:
        print(f"python -m fusedres: error: {e}", file=sys.stderr)
        return 2
    fused_ok = all(r["check"]["ok"] for g in report["groups"] for r in g["results"]
                   if make_provider(r["provider"]).fused)
    fused_ran = not any(s.get("failed") and make_provider(s["provider"]).fused
                        for g in report["groups"] for s in g["skipped"])
    return 0 if fused_ok and fused_ran else 1


if __name__ == "__main__":
    sys.exit(main())
