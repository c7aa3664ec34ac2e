#!/usr/bin/env python
"""Compiles every Triton kernel variant fusedres launches, in every config, for sm_80 and sm_90.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the
whole pipeline down to a cubin (ptxas included). For each kernel variant and config the table
gives, read from that cubin (``cuobjdump``), registers per thread and the stack frame, which
holds spilled registers; then shared memory per block and whether the PTX holds tensor-core
instructions (``mma``; ``wgmma`` or ``mma`` on sm_90). Exit status 1 on a stack frame (a
spill), shared memory over the device's per-block limit, a kernel whose ``DOT_PRECISION`` is not
"ieee" without tensor-core instructions, or a compile error.

The variants are recorded from the launchers, not listed here. The script calls every op of
fusedres.ops.triton_library (the launchers' only callers) with every combination of its
optional and boolean arguments, in each dtype, memory format and TF32 setting, on one
convolution per path of the conv kernel (_CONV_CASES) and the activations they produce, with
each launch recorded instead of run: the kernel, its pointer dtypes, its constexpr flags and the
int arguments triton specialises (equal to 1: a constant; divisible by 16: a hint), with the
config table of an autotuned launch. The sweep runs once per config index, because launchers
size later launches from the config that ran (the statistics partials). A new flag, dtype rule
or launch is therefore picked up without editing this file; a new op fails until it has a case
in _op_arguments.

A variant's flags (dtype x conv path x prologue x epilogue x dot precision; layout and flags of
the BN kernels) are all compiled, each in the first int specialisation met (see _FORMATS);
``--all-specialisations`` compiles every specialisation met (1x1 weights' two stride patterns),
about a third more work. ``--heaviest-epilogues`` compiles the convolution in two of its nine
epilogues only, the two that keep the most values live at the store: the statistics epilogue
(training, F1) and scale/shift + residual + ReLU (eval, F2), each with and without the F3
prologue; every path, operand kind and config still. ``--bn-flag-cover`` compiles the
BatchNorm kernels in each dtype and layout with their flags in a few combinations that together
compile every flag on and off, every flag on among them (``bn_flag_cover``). CI runs both, with
``--configs-in-turn`` (each variant in one config of its table, the configs of each table in
turn: ``configs_in_turn``) for the lent GPUs' sm_90 under their Triton, and ``--quick`` (the
first config of each table, traced for that config alone) otherwise.

Usage:
    python scripts/check_triton_compile.py            # every variant and config
    python scripts/check_triton_compile.py --heaviest-epilogues --bn-flag-cover --arch 90 \
        --configs-in-turn                           # CI, under the lent GPUs' Triton
    python scripts/check_triton_compile.py --all-specialisations
    python scripts/check_triton_compile.py --quick    # the first config of each table
    python scripts/check_triton_compile.py --arch 90 --jobs 4 --match "conv_fwd fp32 .*ieee"
    python scripts/check_triton_compile.py --list     # the recorded variants, nothing compiled
    python scripts/check_triton_compile.py --json out.json  # also the rows as JSON (the test)

Compiles land in triton's cache (``~/.triton/cache``), so a second run reads cubins back.
TRITON_INTERPRET must be unset (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import importlib
import inspect
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
# The traced launches are recorded, never run: NaN-filling their outputs (tests/conftest.py sets
# this for the test suite, whose environment the test's subprocess inherits) only made each
# architecture's trace take 64 s instead of 21 on 2 cores.
os.environ.pop("FUSEDRES_POISON_OUTPUTS", None)

#: Opt-in shared memory per block (bytes) on A100 (sm_80) and H100 (sm_90).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
#: SMs of A100 and H100 SXM: the reduction launchers size their grids from it.
SM_COUNT = {80: 108, 90: 132}

# (name, N, Cin, H, W, Cout, kernel size, stride, padding, groups): one convolution of
# ResNet-50 for each path of the conv kernel (FLAT_K: the stem; tap by tap: a 3x3; POINTWISE: a
# 1x1), and a 1x1 on a channel count that is no multiple of 64 (FLAT_K and POINTWISE together).
# Other geometries (strides, groups, dilation) change only which int arguments triton
# specialises. The stem's batch is large enough for the statistics finalize to take its
# two-level path; the others' only keep N*H*W a multiple of 16, as it is in training.
_CONV_CASES = (
    ("stem 7x7/2", 12, 3, 224, 224, 64, 7, 2, 3, 1),
    ("3x3", 2, 64, 56, 56, 64, 3, 1, 1, 1),
    ("1x1", 2, 64, 56, 56, 256, 1, 1, 0, 1),
    ("1x1 24 channels", 2, 24, 56, 56, 64, 1, 1, 0, 1),
)
_DTYPES = ("float16", "bfloat16", "float32")
# Memory formats of every tensor of a call. The first one met of each flag set is what a default
# run compiles. The conv launcher hands the kernel channels_last weights whatever their format
# (fusedres.kernels.conv.prepared_weight), so formats differ only in the BN kernels' layouts and
# in 1x1 weights, which are channels_last in both formats with different (unused) strides of
# their unit dimensions.
_FORMATS = ("contiguous_format", "channels_last")
# int64: num_batches_tracked, which the statistics finalize reads (momentum=None).
_TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int64": "i64"}
#: The convolution epilogues --heaviest-epilogues keeps, as (AFFINE, HAS_RESIDUAL, RELU, STATS).
HEAVIEST_EPILOGUES = ((False, False, False, True), (True, True, True, False))
_EPILOGUE_FLAGS = ("AFFINE", "HAS_RESIDUAL", "RELU", "STATS")
#: The BatchNorm kernels' layout flag: --bn-flag-cover keeps both layouts whole, like dtypes.
LAYOUT_FLAG = "CHANNELS_LAST"


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel; every field is plain data (it crosses to worker processes).

    Attributes:
        kernel: ``"module:name"`` of the ``@triton.jit`` function.
        signature: (argument, triton type) of each runtime argument, "constexpr" for flags and
            for ints specialised to 1; the config's constexprs are not in it.
        flags: (argument, value) of the constexpr arguments the launcher passes.
        ones: (argument, 1) of the int arguments triton specialised to the constant 1.
        aligned: indices of the arguments triton marks divisible by 16.
        configs: (meta items, num_warps, num_stages, maxnreg) of each config the launcher may
            run.
        origin: the first op call that launched it.
    """

    kernel: str
    signature: tuple
    flags: tuple
    ones: tuple
    aligned: tuple
    configs: tuple
    origin: str

    @property
    def dtype(self) -> str:
        return next(t[1:] for _, t in self.signature if t.startswith("*"))

    @property
    def flag_set(self) -> tuple:
        """What tells variants apart, int specialisations aside: kernel, dtypes, flags, configs."""
        pointers = tuple(t for _, t in self.signature if t.startswith("*"))
        return self.kernel, pointers, self.flags, self.configs

    @property
    def needs_tensor_cores(self) -> bool:
        return dict(self.flags).get("DOT_PRECISION", "ieee") != "ieee"

    @property
    def epilogue(self):
        """(AFFINE, HAS_RESIDUAL, RELU, STATS) of a convolution variant, None for other kernels."""
        flags = dict(self.flags)
        if not all(name in flags for name in _EPILOGUE_FLAGS):
            return None
        return tuple(flags[name] for name in _EPILOGUE_FLAGS)

    @property
    def label(self) -> str:
        name = self.kernel.split(":")[1].strip("_").removesuffix("_kernel")
        flags = []
        for arg, value in self.flags:
            if isinstance(value, bool):
                flags += [arg] if value else []
            elif isinstance(value, str):
                flags.append(value)
            else:
                flags.append(f"{arg}={value}")
        return " ".join([name, self.dtype, *flags])


def bn_flag_cover(variants: list) -> list:
    """The BatchNorm variants that compile every flag both ways, per dtype and layout.

    A BatchNorm kernel's boolean flags (RELU, HAS_RESIDUAL, WRITE_DZ, ...) each switch a region
    of its code on or off. Per kernel, dtypes, layout and config table: the variant with the
    most flags on (the most values live at once, the spill check's case), the one with the
    fewest, then, greedily, one for each (flag, value) the variants met and these two left out.
    So every line of each kernel compiles in every dtype and layout with a fraction of the flag
    combinations (55 of 138 BatchNorm variants for sm_90). Other kernels pass through.

    Args:
        variants: every variant met, as ``trace_variants`` returns them.

    Returns:
        The kept variants, in their input order.
    """
    def switches(variant) -> set:
        return {(k, v) for k, v in variant.flags if isinstance(v, bool) and k != LAYOUT_FLAG}

    def flags_on(variant) -> int:
        return sum(v for _, v in switches(variant))

    # The convolution passes through: --heaviest-epilogues selects among its variants.
    kept = {id(v) for v in variants if v.epilogue is not None}
    groups: dict = {}
    for variant in variants:
        if variant.epilogue is None:
            kernel, pointers, flags, configs = variant.flag_set
            fixed = tuple((k, v) for k, v in flags if not isinstance(v, bool) or k == LAYOUT_FLAG)
            groups.setdefault((kernel, pointers, fixed, configs), []).append(variant)
    for group in groups.values():
        chosen = [max(group, key=flags_on), min(group, key=flags_on)]
        covered = set().union(*map(switches, chosen))
        for variant in group:
            if not switches(variant) <= covered:
                chosen.append(variant)
                covered |= switches(variant)
        kept.update(map(id, chosen))
    return [v for v in variants if id(v) in kept]


def configs_in_turn(variants: list) -> list:
    """(variant, config) pairs that compile every variant once and every config at least once.

    The variants of one kernel and dtype with the same config table form a group; in
    label order, variant i takes config i mod n of the n in the table, and a table with more
    configs than variants gives the rest to the group's first variants again. Registers and
    spills depend on the config (tile sizes, warps, stages) as much as on the flags, so this
    checks each config of each table under some flag set at the cost of one compile per
    variant, where every variant in every config costs up to four times as many.

    Args:
        variants: the variants to compile, in the order their compiles should run.

    Returns:
        (variant, config) pairs, grouped as the variants came.
    """
    groups: dict = {}
    for variant in variants:
        groups.setdefault((variant.kernel, variant.dtype, variant.configs), []).append(variant)
    pairs = []
    for (_, _, configs), group in groups.items():
        group.sort(key=lambda v: v.label)
        pairs += [(group[i % len(group)], configs[i % len(configs)])
                  for i in range(max(len(group), len(configs)))]
    return pairs


def _specialisation(value):
    """(triton type, divisible by 16) of a runtime argument, as triton's launcher decides them.

    Ints equal to 1 become constexprs; ints and pointers divisible by 16 get a divisibility hint.
    """
    import torch
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPE[str(value.dtype).removeprefix("torch.")], \
            value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"no triton type for a kernel argument of type {type(value).__name__}")


# The sweep binds the arguments of about 40000 launches to a few functions' signatures: built once
# each, they were a quarter of the sweep's time.
_signature = functools.lru_cache(maxsize=None)(inspect.signature)


class _Recorder:
    """Stands in for the kernel launches of the launchers; keeps one Variant per distinct launch.

    Args:
        arch: the compute capability whose config tables the launches get.
        config_index: the config autotuned launches report as having run.
    """

    def __init__(self, arch: int, config_index: int):
        self.arch = arch
        self.config_index = config_index
        self.origin = ""
        self.variants: dict = {}
        self.longest_table = 1

    def record(self, kernel, args, constexprs: dict, configs) -> None:
        params = _signature(kernel.fn).bind_partial(*args, **constexprs).arguments
        signature, flags, ones, aligned = [], [], [], []
        for index, param in enumerate(kernel.params):
            if param.name not in params:
                continue  # a constexpr of the config
            value = params[param.name]
            if param.is_constexpr:
                signature.append((param.name, "constexpr"))
                flags.append((param.name, value))
                continue
            kind, divisible = _specialisation(value)
            signature.append((param.name, kind))
            if kind == "constexpr":
                ones.append((param.name, value))
            elif divisible:
                aligned.append(index)
        configs = tuple((tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages, c.maxnreg)
                        for c in configs)
        key = (f"{kernel.fn.__module__}:{kernel.fn.__name__}", tuple(signature), tuple(flags),
               tuple(ones), tuple(aligned), configs)
        if key not in self.variants:
            self.variants[key] = Variant(*key, origin=self.origin)

    def launch(self, kernel, grid, args, **options):
        """fusedres.kernels._launch.launch, recording instead of launching."""
        from fusedres.kernels import _launch
        bound = _signature(_launch.launch).bind(kernel, grid, args, **options).arguments
        configs = _launch.arch_configs(bound["table"], self.arch)
        self.longest_table = max(self.longest_table, len(configs))
        self.record(getattr(kernel, "kernel", kernel), args, bound.get("constexprs", {}),
                    configs)
        return configs[min(self.config_index, len(configs) - 1)]


class _DirectLaunch:
    """A ``@triton.jit`` kernel launched as ``kernel[grid](...)``, recorded with the one config
    the launcher passes (its ``BLOCK_*`` constexprs, num_warps and num_stages)."""

    def __init__(self, kernel, recorder: _Recorder):
        self.kernel = kernel
        self.recorder = recorder

    def __getitem__(self, grid):
        import triton

        def run(*args, num_warps=4, num_stages=3, maxnreg=None, **constexprs):
            tiles = {k: v for k, v in constexprs.items() if k.startswith("BLOCK_")}
            flags = {k: v for k, v in constexprs.items() if k not in tiles}
            config = triton.Config(tiles, num_warps=num_warps, num_stages=num_stages,
                                   maxnreg=maxnreg)
            self.recorder.record(self.kernel, args, flags, [config])

        return run


def _op_arguments(name: str, case: tuple, dtype, fmt) -> dict:
    """Every argument of op ``name`` for a convolution ``case``, optional tensors present.

    The BatchNorm ops get the activation the case's convolution produces.
    """
    import torch

    from fusedres.backend import conv_output_hw
    _, n, cin, h, w, cout, k, stride, pad, groups = case
    ho, wo = conv_output_hw((h, w), (k, k), (stride, stride), (pad, pad), (1, 1))

    def act(*shape):
        return torch.empty(shape, dtype=dtype, memory_format=fmt)

    def channel(count=cout):
        return torch.empty(count, dtype=torch.float32)

    geometry = dict(x=act(n, cin, h, w), weight=act(cout, cin // groups, k, k),
                    stride=[stride] * 2, padding=[pad] * 2, dilation=[1, 1], groups=groups)
    z = act(n, cout, ho, wo)
    if name == "conv2d":
        return dict(geometry, scale=channel(), shift=channel(), residual=z,
                    in_scale=channel(cin), in_shift=channel(cin))
    if name == "conv2d_bn_train":
        # The running statistics its finalize updates in place (float32, the buffers of a float32
        # model under autocast), the counter momentum=None reads, a momentum, and F3's scale and
        # shift of the previous unit.
        return dict(geometry, gamma=channel(), beta=channel(), eps=1e-5, running_mean=channel(),
                    running_var=channel(), num_batches_tracked=torch.zeros((), dtype=torch.int64),
                    momentum=0.1, in_scale=channel(cin), in_shift=channel(cin))
    if name == "bn_stats":
        return dict(z=z)
    if name == "bn_act_fwd":
        return dict(z=z, scale=channel(), shift=channel(), residual=act(n, cout, ho, wo))
    if name == "bn_act_bwd":
        return dict(dy=z, y=act(n, cout, ho, wo), z=act(n, cout, ho, wo), mean=channel(),
                    invstd=channel(), weight=channel())
    raise NotImplementedError(f"scripts/check_triton_compile.py has no arguments for the op "
                              f"{name!r}: add them to _op_arguments")


def _op_calls():
    """(description, op, kwargs, allow_tf32) for every combination the sweep makes."""
    import torch

    from fusedres.ops import triton_library
    for name, case, dtype_name, fmt, allow_tf32 in itertools.product(
            triton_library.__all__, _CONV_CASES, _DTYPES, _FORMATS, (True, False)):
        op = getattr(triton_library, name)
        base = _op_arguments(name, case, getattr(torch, dtype_name), getattr(torch, fmt))
        choices = []
        for arg in op._schema.arguments:
            kind = str(arg.type)
            if kind.startswith("Optional"):
                choices.append([(arg.name, None), (arg.name, base[arg.name])])
            elif kind == "bool":
                choices.append([(arg.name, False), (arg.name, True)])
            else:
                choices.append([(arg.name, base[arg.name])])
        for kwargs in itertools.product(*choices):
            yield (f"{name} {case[0]} {dtype_name} {fmt} tf32={allow_tf32}", op,
                   dict(kwargs), allow_tf32)


@contextlib.contextmanager
def _recording(recorder: _Recorder):
    """Routes every launch of fusedres.kernels into ``recorder`` (module attributes restored)."""
    import torch
    import triton

    from fusedres.kernels import bn, conv
    saved = []

    def patch(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    try:
        for module in (bn, conv):
            patch(module, "launch", recorder.launch)
            patch(module, "interpreting", lambda: False)
            if hasattr(module, "device_arch"):
                patch(module, "device_arch", lambda device: recorder.arch)
            if hasattr(module, "multiprocessor_count"):
                patch(module, "multiprocessor_count", lambda device: SM_COUNT[recorder.arch])
            for attr, value in vars(module).copy().items():
                if isinstance(value, triton.runtime.JITFunction):
                    patch(module, attr, _DirectLaunch(value, recorder))
        patch(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def trace_variants(arch: int, first_config_only: bool = False) -> tuple[list, int, int]:
    """(variants, op calls made, op calls the launchers rejected) for ``arch``; with
    ``first_config_only`` the sweep for config 0 alone (--quick compiles nothing else)."""
    import torch

    calls = rejected = index = 0
    variants: dict = {}
    longest_table = 1
    while index < (1 if first_config_only else longest_table):
        recorder = _Recorder(arch, index)
        with _recording(recorder):
            for description, op, kwargs, allow_tf32 in _op_calls():
                recorder.origin = description
                torch.backends.cudnn.allow_tf32 = allow_tf32
                calls += 1
                try:
                    op(**kwargs)
                except (TypeError, ValueError, AttributeError, RuntimeError):
                    rejected += 1  # e.g. scale without shift: no launch to check
        for key, variant in recorder.variants.items():
            variants.setdefault(key, variant)
        longest_table = max(longest_table, recorder.longest_table)
        index += 1
    return list(variants.values()), calls, rejected


def _cuobjdump() -> str:
    from triton.backends.nvidia import compiler as nvc
    try:
        from triton import knobs
        return knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError):
        return os.path.join(os.path.dirname(nvc.__file__), "bin", "cuobjdump")


def _resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers per thread, stack frame bytes, local stores) of the cubin triton built.

    Triton kernels keep no arrays in local memory, so a stack frame holds spilled registers and
    each local store (``STL`` in the SASS) is a spill store. The cubin is read rather than
    ``ptxas -v`` run again: triton passes ptxas flags of its own (``--regAllocOptLevel=2`` in
    3.9) that change the register allocation.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        regs, stack = int(m.group(1)), int(m.group(2))
        if not stack:
            return regs, 0, 0
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    return regs, stack, len(re.findall(r"\bSTL\b", sass))


def compile_variant(task: tuple) -> dict:
    """Compiles one (arch, variant, config) and measures it; runs in a worker process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch, variant, (meta, num_warps, num_stages, maxnreg) = task
    module, name = variant.kernel.split(":")
    kernel = getattr(importlib.import_module(module), name)
    signature = dict(variant.signature, **{k: "constexpr" for k, _ in meta})
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs=dict(variant.flags + variant.ones + meta),
                       attrs={(i,): [["tt.divisibility", 16]] for i in variant.aligned})
    t0 = time.time()
    try:
        options = {"num_warps": num_warps, "num_stages": num_stages}
        if maxnreg is not None:
            options["maxnreg"] = maxnreg
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # noqa: BLE001 - report every failing variant
        return {"error": repr(e)[:300], "seconds": time.time() - t0}
    ptx = compiled.asm["ptx"]
    regs, stack, spills = _resources(compiled.asm["cubin"])
    mma = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.", ptx) else "-")
    return {"regs": regs, "stack": stack, "spills": spills, "smem": compiled.metadata.shared,
            "mma": mma, "seconds": time.time() - t0}


def _variant_row(arch: int, variant: Variant) -> dict:
    return dict(arch=arch, kernel=variant.kernel, label=variant.label, dtype=variant.dtype,
                flags=dict(variant.flags), origin=variant.origin)


def _describe(meta, num_warps: int, num_stages: int, maxnreg) -> str:
    tiles = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in meta)
    cap = f" r{maxnreg}" if maxnreg is not None else ""
    return f"{tiles} w{num_warps} s{num_stages}{cap}"


def _failures(arch: int, variant: Variant, desc: str, row: dict) -> list:
    where = f"sm_{arch} {variant.label} [{desc}] (from {variant.origin})"
    if "error" in row:
        return [f"{where}: compile error {row['error']}"]
    found = []
    if row["stack"]:
        found.append(f"{where}: {row['stack']} bytes of stack frame (spilled registers), "
                     f"{row['spills']} local stores")
    if row["smem"] > SMEM_LIMIT[arch]:
        found.append(f"{where}: {row['smem']} B shared memory > {SMEM_LIMIT[arch]} B")
    if variant.needs_tensor_cores and row["mma"] == "-":
        found.append(f"{where}: no tensor-core (mma) instructions")
    return found


def _default_jobs() -> int:
    """One compiler process per core this process may run on (2 in CI, 16 on the GPU hosts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API outside Linux
        return os.cpu_count() or 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_LIMIT),
                        help="compute capability (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="first config of each table only")
    parser.add_argument("--configs-in-turn", action="store_true",
                        help="each variant in one config: the variants of a kernel and dtype "
                             "that share a config table take its configs in turn, so every "
                             "config and every variant compiles once (see configs_in_turn)")
    parser.add_argument("--jobs", type=int, default=_default_jobs(),
                        help="compiler processes (default: one per core this process may use)")
    parser.add_argument("--list", action="store_true", help="print the variants, compile nothing")
    parser.add_argument("--all-specialisations", action="store_true",
                        help="every int specialisation met (both 1x1 weight stride patterns), not "
                             "the first of each flag set: about a third more compiles")
    parser.add_argument("--heaviest-epilogues", action="store_true",
                        help="the convolution in its statistics and scale/shift + residual + ReLU "
                             "epilogues only (with and without the prologue; every path, operand "
                             "kind and config): CI's check")
    parser.add_argument("--bn-flag-cover", action="store_true",
                        help="the BatchNorm kernels in a set of flag combinations that compiles "
                             "each flag on and off, per dtype and layout, with every flag on "
                             "among them (see bn_flag_cover): CI's check")
    parser.add_argument("--json", metavar="PATH",
                        help="also write to PATH, as JSON, every compile's row ('compiled') and "
                             "every kernel variant before --heaviest-epilogues, --bn-flag-cover "
                             "and --match chose among them ('met')")
    parser.add_argument("--match", metavar="REGEX",
                        help="only the variants whose label (as --list prints it) matches")
    args = parser.parse_args(argv)
    if args.quick and args.configs_in_turn:
        parser.error("--quick and --configs-in-turn choose configs in two ways: give one")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    import triton

    t_start = time.time()
    tasks, met_rows = [], []
    for arch in args.arch or sorted(SMEM_LIMIT):
        variants, calls, rejected = trace_variants(arch, first_config_only=args.quick)
        met = len(variants)
        if not args.all_specialisations:
            first: dict = {}
            for variant in variants:
                first.setdefault(variant.flag_set, variant)
            variants = list(first.values())
        print(f"sm_{arch}: {len(variants)} kernel variants of {met} met in {calls} op calls "
              f"({rejected} rejected by the launchers)")
        met_rows += [_variant_row(arch, v) for v in variants]
        if args.heaviest_epilogues:
            variants = [v for v in variants
                        if v.epilogue is None or v.epilogue in HEAVIEST_EPILOGUES]
        if args.bn_flag_cover:
            variants = bn_flag_cover(variants)
        if args.match:
            variants = [v for v in variants if re.search(args.match, v.label)]
        variants = sorted(variants, key=lambda v: (v.kernel, v.label, v.origin))
        if args.list:
            for variant in variants:
                ones = " ".join(arg for arg, _ in variant.ones)
                print(f"  {variant.label:<60} from {variant.origin}; ints equal to 1: {ones}")
        if args.configs_in_turn:
            tasks += [(arch, variant, config) for variant, config in configs_in_turn(variants)]
        else:
            tasks += [(arch, variant, config) for variant in variants
                      for config in (variant.configs[:1] if args.quick else variant.configs)]
    if args.list:
        return 0
    print(f"triton {triton.__version__}: {len(tasks)} compiles on {args.jobs} processes "
          f"(traced in {time.time() - t_start:.0f} s)")
    print(f"{'arch':<5} {'kernel variant':<52} {'config':<26} {'regs':>4} {'stack':>5} "
          f"{'smem KB':>7} {'mma':>5} {'s':>4}")
    failures, rows = [], []
    # spawn, not fork: the parent has imported torch and triton, whose threads fork badly.
    with concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for (arch, variant, config), row in zip(tasks, pool.map(compile_variant, tasks)):
            desc = _describe(*config)
            if "error" in row:
                print(f"sm_{arch:<2} {variant.label:<52} {desc:<26} COMPILE ERROR")
            else:
                print(f"sm_{arch:<2} {variant.label:<52} {desc:<26} {row['regs']:>4} "
                      f"{row['stack']:>5} {row['smem'] / 1024:>7.1f} {row['mma']:>5} "
                      f"{row['seconds']:>4.1f}", flush=True)
            failures += _failures(arch, variant, desc, row)
            meta, num_warps, num_stages, maxnreg = config
            rows.append(dict(row, **_variant_row(arch, variant), config=dict(meta),
                             num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"compiled": rows, "met": met_rows}, f, indent=1)
    print(f"\n{len(tasks)} compiles in {time.time() - t_start:.0f} s")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("all kernel variants compiled: no stack frame (spills), shared memory within limits, "
          "tensor cores wherever the dot precision allows them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
