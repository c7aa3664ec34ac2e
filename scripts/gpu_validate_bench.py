"""The timing stage of scripts/gpu_validate.sh, one process, CUDA events, in this order:

1. ``peaks``: the device's copy bandwidth (bytes read + written) and bf16 matmul rate, the
   ceilings the kernels' GB/s and TFLOP/s are read against;
2. ``block``: each ResNet-50 Bottleneck stage (an identity block and the downsampling first
   block of each stage) at batch 128, bf16 autocast, channels_last: a training step (forward
   with batch statistics + backward of the input and every parameter) and an eval forward, for
   eager_cl, triton and cuda, and each of them again replayed as one CUDA graph per step
   (``<provider>+graph``: the step without its host launch cost, see :func:`cuda_graphed`);
3. ``model``: the whole ResNet-50 (the plan's ``net_arch``) training step (forward,
   cross-entropy, backward, SGD) at batch 256, and its eval forward, same providers;
4. ``bn``: the BatchNorm kernels (statistics; scale/shift + residual + ReLU; their backward) in
   GB/s against the copy bandwidth, at the four stage shapes;
5. ``conv``: the Triton convolution's TFLOP/s against cuDNN's (F.conv2d) on four shapes;
6. ``profile``: torch.profiler's kernel table of one triton Bottleneck training step;
7. ``compile``, last because inductor compiles for tens of seconds per graph: each block again
   with torch.compile beside eager_cl, triton and cuda, then the whole model if time allows.

Providers are timed round by round in turn (their order rotating), each round ``steps`` calls
back to back between two CUDA events, so the per-step time includes the host's launch gaps as
training sees them; records carry the median, quartiles, min and max over the rounds, the host
time per step (the CPU's time to issue a step's work), the first call (Triton autotuning or
torch.compile included) and the peak memory of a step (fusedres.report.peak_memory). The
Triton kernels autotune here (FUSEDRES_TRITON_CONFIG unset), on configs the warm-up compiled.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import fusedres
from fusedres.report import (Provider, as_input, autocast, bn_ops, build_model, make_eval_step,
                             make_provider, make_train_step, peak_memory, sync)
from gpu_validate_common import Budget, Plan, Results, backend_status, block_spec, log, units

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: Bytes a kernel round moves on a GPU (~1 ms at 2-4 TB/s): a round is many launches then.
ROUND_BYTES = 2e9
MAX_LAUNCHES = 50
#: Consecutive steps per round of a block (a step takes milliseconds; one event pair per round).
BLOCK_STEPS = 5


def _quartiles(xs: list) -> tuple:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def time_rounds(fns: dict, rounds: int, warmup: int, steps: int,
                device: torch.device) -> dict:
    """Times every function of ``fns`` round by round, in turn.

    Args:
        fns: {provider: function running one step}.
        rounds: timed rounds; warmup: untimed calls of each function first (the first one is
            timed apart: Triton's autotuning and torch.compile happen there).
        steps: calls per round, back to back, between two events.

    Returns:
        {provider: {"median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms" (per step),
        "host_ms" (median host time to issue a step), "first_call_s"}}.
    """
    first = {}
    for key, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        sync(device)
        first[key] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            fn()
        sync(device)
    gpu = device.type == "cuda"
    dev = {key: [] for key in fns}
    host = {key: [] for key in fns}
    keys = list(fns)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            fn = fns[key]
            sync(device)
            if gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            t1 = time.perf_counter()
            if gpu:
                end.record()
                end.synchronize()
                dev[key].append(start.elapsed_time(end) / steps)
            else:
                dev[key].append((time.perf_counter() - t0) * 1e3 / steps)
            host[key].append((t1 - t0) * 1e3 / steps)
    out = {}
    for key in fns:
        q1, med, q3 = _quartiles(dev[key])
        out[key] = {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "min_ms": min(dev[key]),
                    "max_ms": max(dev[key]), "host_ms": statistics.median(host[key]),
                    "first_call_s": round(first[key], 3)}
    return out


def cuda_graphed(step: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``step`` captured as one CUDA graph; the returned function replays it.

    PyTorch's whole-network capture: warm-up calls on a side stream (Triton's autotuning,
    cuDNN's algorithm search and the optimizer's momentum buffers happen there), then one
    capture; every tensor the step allocates comes from the graph's pool and is rewritten by
    each replay. A step that synchronises with the host or allocates on the CPU fails to capture
    (an error record, not a timing).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


class Bench:
    """The measurements of one stage; records go to ``results``.

    Args:
        plan: sizes, providers, budgets.
        results: the record writer; budget: the stage's deadline.
    """

    def __init__(self, plan: Plan, results: Results, budget: Budget):
        self.plan = plan
        self.results = results
        self.budget = budget
        self.device = torch.device(plan.device)
        self.dtype = DTYPES[plan.bench_dtype]
        self.peaks: dict = {}
        self.errors = 0

    # -- helpers ------------------------------------------------------------------------------

    def usable(self, names: tuple) -> list:
        """The providers of ``names`` that run here; the others are recorded as skipped."""
        found = []
        for name in names:
            p = make_provider(name)
            ok, why = backend_status(p.backend, self.device.type)
            if ok:
                found.append(p)
            else:
                self.results.skip(f"provider {name}", f"unusable: {why}")
        return found

    def run(self, what: str, estimate: float, fn: Callable[[], None]) -> bool:
        """Runs ``fn`` when ``estimate`` seconds fit in the budget; returns whether it ran."""
        if not self.budget.fits(what, estimate):
            return False
        log(what)
        self.errors += not self.results.guarded(what, fn)
        return True

    def record_group(self, part: str, timings: dict, **labels) -> None:
        """One ``bench`` record per provider of an interleaved measurement."""
        base = timings.get("eager_cl")
        for name, t in timings.items():
            vs = base["median_ms"] / t["median_ms"] if base else None
            self.results.write("bench", part=part, provider=name, **labels,
                               **{k: round(v, 4) if isinstance(v, float) else v
                                  for k, v in t.items()},
                               vs_eager_cl=None if vs is None else round(vs, 3))

    # -- 1. peaks -----------------------------------------------------------------------------

    def peaks_(self) -> None:
        """Copy bandwidth (read + write) and the matmul rate, medians of rounds."""
        n = self.plan.copy_bytes
        src = torch.empty(n, dtype=torch.uint8, device=self.device).random_()
        dst = torch.empty_like(src)
        size = self.plan.matmul_size
        mm_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        a = torch.randn(size, size, device=self.device, dtype=mm_dtype)
        b = torch.randn(size, size, device=self.device, dtype=mm_dtype)
        t = time_rounds({"copy": lambda: dst.copy_(src), "matmul": lambda: a @ b},
                        self.plan.rounds, self.plan.warmup, 5, self.device)
        self.peaks = {"copy_GBps": 2 * n / (t["copy"]["median_ms"] / 1e3) / 1e9,
                      "matmul_TFLOPs": 2 * size**3 / (t["matmul"]["median_ms"] / 1e3) / 1e12}
        self.results.write("peaks", **{k: round(v, 2) for k, v in self.peaks.items()},
                           how=f"copy_ of {n / 2**20:.0f} MiB; {str(mm_dtype)[6:]} "
                               f"{size}^3 matmul; medians of {self.plan.rounds} rounds of 5",
                           cudnn_benchmark=torch.backends.cudnn.benchmark)

    # -- 2. blocks ----------------------------------------------------------------------------

    def block_step(self, name: str, provider: Provider, training: bool) -> Callable[[], None]:
        """One step of ResNet-50's block ``name`` on ``provider`` (also the warm-ups' step)."""
        p = self.plan
        spec = block_spec(p, "resnet50", name)
        torch.manual_seed(0)
        block = spec.build()
        if provider.backend != "eager":
            block = fusedres.convert(block, provider.backend)
        fmt = torch.channels_last if provider.channels_last else torch.contiguous_format
        block = block.to(self.device).train(training).to(memory_format=fmt)
        params = list(block.parameters())
        module = block
        if provider.compiled:
            # Each block compiles the same forward code: without a reset, dynamo's recompile
            # limit would run later blocks eagerly.
            torch._dynamo.reset()
            module = torch.compile(block, dynamic=False)
        x = torch.randn(p.bench_batch, spec.inplanes, spec.size, spec.size, device=self.device,
                        dtype=self.dtype).contiguous(memory_format=fmt)
        x.requires_grad_(training)
        out_size = (spec.size + 2 - 3) // spec.stride + 1
        expansion = 4 if spec.kind == "bottleneck" else 1
        gy = torch.randn(p.bench_batch, spec.planes * expansion, out_size, out_size,
                         device=self.device, dtype=self.dtype).contiguous(memory_format=fmt)

        def forward():
            with autocast(self.device, self.dtype):
                return module(x)

        if training:
            return lambda: torch.autograd.grad(forward(), [x, *params], gy)

        def eval_step():
            with torch.inference_mode():
                forward()
        return eval_step

    def with_graphs(self, fns: dict, providers: list, make_step: Callable, what: str) -> dict:
        """``fns`` plus ``<name>+graph`` (the step replayed as a CUDA graph) for the providers
        of ``plan.graph_providers`` in the main phase; a capture that fails is an error record
        and leaves the others timed."""
        if self.device.type != "cuda":
            return fns
        for pr in providers:
            if pr.name not in self.plan.graph_providers:
                continue

            def capture(pr=pr):
                fns[f"{pr.name}+graph"] = cuda_graphed(make_step(pr))
            self.errors += not self.results.guarded(f"{what} {pr.name}+graph", capture)
        return fns

    def add_memory_and_rate(self, timings: dict, fns: dict, batch: int) -> None:
        """Each provider's peak memory of a step and images per second, into ``timings``."""
        for key, fn in fns.items():
            # A graph's memory is its pool, allocated at capture: a replay allocates nothing.
            timings[key]["peak_mem_bytes"] = (None if key.endswith("+graph")
                                              else peak_memory(fn, self.device))
            timings[key]["images_per_s"] = batch / (timings[key]["median_ms"] / 1e3)

    def block(self, name: str, mode: str, providers: list, phase: str) -> None:
        training = mode == "train"
        spec = block_spec(self.plan, "resnet50", name)
        fns = {pr.name: self.block_step(name, pr, training) for pr in providers}
        if phase == "main":
            fns = self.with_graphs(fns, providers,
                                   lambda pr: self.block_step(name, pr, training),
                                   f"block {name} {mode}")
        timings = time_rounds(fns, self.plan.rounds, self.plan.warmup,
                              1 if self.plan.dry_run else BLOCK_STEPS, self.device)
        self.add_memory_and_rate(timings, fns, self.plan.bench_batch)
        self.record_group("block", timings, phase=phase, name=name, mode=mode,
                          group=f"{name} {mode}", batch=self.plan.bench_batch,
                          dtype=self.plan.bench_dtype,
                          shape=f"{spec.inplanes}->{spec.planes} s{spec.stride} {spec.size}px",
                          rounds=self.plan.rounds)

    # -- 3. the whole model -------------------------------------------------------------------

    def model_step(self, provider: Provider, training: bool) -> Callable[[], None]:
        p = self.plan
        torch.manual_seed(0)
        base = getattr(fusedres.models, p.net_arch)()
        if provider.compiled:
            torch._dynamo.reset()
        model = build_model(p.net_arch, provider, self.device, base)
        x = as_input(torch.randn(p.model_batch, 3, p.model_image, p.model_image,
                                 device=self.device), provider)
        if training:
            target = torch.randint(0, 1000, (p.model_batch,), device=self.device)
            return make_train_step(model, x, target, self.dtype)
        return make_eval_step(model, x, self.dtype)

    def model(self, mode: str, providers: list, phase: str) -> None:
        fns = {pr.name: self.model_step(pr, mode == "train") for pr in providers}
        if phase == "main":
            fns = self.with_graphs(fns, providers,
                                   lambda pr: self.model_step(pr, mode == "train"),
                                   f"model {mode}")
        timings = time_rounds(fns, self.plan.rounds, self.plan.warmup, 1, self.device)
        self.add_memory_and_rate(timings, fns, self.plan.model_batch)
        arch = self.plan.net_arch
        self.record_group("model", timings, phase=phase, name=arch, mode=mode,
                          group=f"{arch} {mode}", batch=self.plan.model_batch,
                          image=self.plan.model_image, dtype=self.plan.bench_dtype,
                          rounds=self.plan.rounds)

    # -- 4. BatchNorm kernels -----------------------------------------------------------------

    def _launches(self, nbytes: int) -> int:
        return 1 if self.plan.dry_run else min(MAX_LAUNCHES, math.ceil(ROUND_BYTES / nbytes))

    def bn_ops(self, provider: str, c: int, hw: int) -> dict:
        """{op: (function, bytes it must move at least)} of one activation shape; the byte
        counts of benchmarks/test_bench_triton.py (1, 3 and 7 tensor passes)."""
        n, dev = self.plan.bench_batch, self.device

        def act():
            return torch.randn(n, c, hw, hw, device=dev, dtype=self.dtype).contiguous(
                memory_format=torch.channels_last)

        def channel(lo=0.5, hi=1.5):
            return torch.empty(c, device=dev).uniform_(lo, hi)

        z, res, dy, y = act(), act(), act(), torch.relu(act())
        scale, shift = channel(), channel(-0.5, 0.5)
        mean, invstd, gamma = channel(-0.1, 0.1), channel(), channel()
        one = z.numel() * z.element_size()
        ops = bn_ops(provider)
        return {"bn_stats": (lambda: ops.bn_stats(z), one),
                "bn_act_fwd": (lambda: ops.bn_act_fwd(z, scale, shift, res, True), 3 * one),
                "bn_act_bwd": (lambda: ops.bn_act_bwd(dy, y, z, mean, invstd, gamma, True, True,
                                                      True), 7 * one)}

    def bn(self, c: int, hw: int, providers: list) -> None:
        ops = {pr: self.bn_ops(pr, c, hw) for pr in providers}
        for op in ("bn_stats", "bn_act_fwd", "bn_act_bwd"):
            nbytes = ops[providers[0]][op][1]
            timings = time_rounds({pr: ops[pr][op][0] for pr in providers}, self.plan.rounds,
                                  self.plan.warmup, self._launches(nbytes), self.device)
            for pr, t in timings.items():
                gbps = nbytes / (t["median_ms"] / 1e3) / 1e9
                copy = self.peaks.get("copy_GBps")
                self.results.write("kernel", part="bn", op=op, provider=pr,
                                   shape=f"{self.plan.bench_batch}x{c}x{hw}x{hw}",
                                   median_ms=round(t["median_ms"], 4),
                                   q1_ms=round(t["q1_ms"], 4), q3_ms=round(t["q3_ms"], 4),
                                   bytes=nbytes, GBps=round(gbps, 1),
                                   of_copy=round(gbps / copy, 3) if copy else None)

    # -- 5. the Triton convolution against cuDNN ----------------------------------------------

    def conv_fns(self, unit_name: str) -> tuple:
        """(unit, {provider: plain convolution}, FLOPs) of ResNet-50's unit ``unit_name``."""
        from fusedres.kernels import conv

        u = units(self.plan, "resnet50", self.plan.bench_batch)[unit_name]
        x = torch.randn(u.n, u.cin, u.h, u.w, device=self.device, dtype=self.dtype).contiguous(
            memory_format=torch.channels_last)
        w = (torch.randn(u.cout, u.cin // u.groups, u.kernel, u.kernel, device=self.device)
             / (u.cin * u.kernel**2) ** 0.5).to(self.dtype).contiguous(
            memory_format=torch.channels_last)
        st, pad = (u.stride, u.stride), (u.padding, u.padding)
        aten = "cudnn" if self.device.type == "cuda" else "aten"
        fns = {"triton": lambda: conv.conv2d(x, w, st, pad, (1, 1), u.groups),
               aten: lambda: F.conv2d(x, w, None, st, pad, 1, u.groups)}
        return u, fns, 2 * u.out_elems * (u.cin // u.groups) * u.kernel**2

    def conv(self, unit_name: str) -> None:
        u, fns, flops = self.conv_fns(unit_name)
        launches = self._launches(2 * (u.x_elems + u.out_elems))
        timings = time_rounds(fns, self.plan.rounds, self.plan.warmup, launches, self.device)
        ref = timings.get("cudnn") or timings.get("aten")
        for pr, t in timings.items():
            tflops = flops / (t["median_ms"] / 1e3) / 1e12
            peak = self.peaks.get("matmul_TFLOPs")
            self.results.write("kernel", part="conv", op=unit_name, provider=pr,
                               shape=f"{u.n}x{u.cin}x{u.h}x{u.w} -> {u.cout} "
                                     f"{u.kernel}x{u.kernel}/{u.stride}",
                               median_ms=round(t["median_ms"], 4), q1_ms=round(t["q1_ms"], 4),
                               q3_ms=round(t["q3_ms"], 4), TFLOPs=round(tflops, 1),
                               of_matmul=round(tflops / peak, 3) if peak else None,
                               vs_cudnn=round(ref["median_ms"] / t["median_ms"], 3))

    # -- 6. the profiler's kernel table -------------------------------------------------------

    def profile(self, name: str) -> None:
        """torch.profiler over one triton training step of block ``name``, after warm-up."""
        from torch.profiler import ProfilerActivity, profile

        step = self.block_step(name, make_provider("triton"), True)
        for _ in range(2):
            step()
        sync(self.device)
        gpu = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        # acc_events: torch 2.11 and 2.12 warn without it (fusedres.report.cpu_peak_memory).
        with profile(activities=activities, acc_events=True) as prof:
            step()
            sync(self.device)
        averages = prof.key_averages()
        key = "self_device_time_total" if gpu else "self_cpu_time_total"
        rows = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
        kernels = [e for e in averages if gpu and e.device_type == torch.autograd.DeviceType.CUDA]
        self.results.write(
            "profile", part="profile", name=name, provider="triton", mode="train",
            batch=self.plan.bench_batch, sort_by=key,
            kernel_launches=sum(e.count for e in kernels),
            device_ms=round(sum(e.self_device_time_total for e in kernels) / 1e3, 3),
            top=[{"name": e.key[:90], "calls": e.count,
                  "self_ms": round(getattr(e, key) / 1e3, 4)} for e in rows[:15]],
            table=averages.table(sort_by=key, row_limit=25, max_name_column_width=70))


def warm_functions(plan: Plan) -> list:
    """(label, function) running, on the triton backend, every kernel variant this stage runs
    (the warm-up runs them once per config, so autotuning here compiles nothing)."""
    bench = Bench(plan, None, None)
    triton = make_provider("triton")
    fns = []
    for name in plan.bench_blocks:
        for mode in ("train", "eval"):
            fns.append((f"block {name} {mode}",
                        lambda n=name, m=mode: bench.block_step(n, triton, m == "train")()))
    if "triton" in plan.model_providers:
        fns += [(f"model {mode}", lambda m=mode: bench.model_step(triton, m == "train")())
                for mode in ("train", "eval")]

    def bn_kernels():
        for c, hw in plan.bn_shapes:
            for fn, _ in bench.bn_ops("triton", c, hw).values():
                fn()

    def conv_kernels():
        for name in plan.conv_units:
            bench.conv_fns(name)[1]["triton"]()
    return fns + [("bn kernels", bn_kernels), ("conv kernels", conv_kernels)]


def compile_warm_functions(plan: Plan) -> list:
    """(label, function) compiling, with one step each, every torch.compile graph the compile
    phase times, in the order it times them."""
    bench = Bench(plan, None, None)
    compiled = make_provider("compile")
    fns = [(f"block {name} {mode}",
            lambda n=name, m=mode: bench.block_step(n, compiled, m == "train")())
           for mode in ("train", "eval") for name in plan.bench_blocks]
    return fns + [(f"model {mode}", lambda m=mode: bench.model_step(compiled, m == "train")())
                  for mode in ("train", "eval")]


def main(args, plan: Plan) -> int:
    """The stage; exit status 1 when a measurement raised."""
    # Autotuned, as users run the kernels (the warm-up compiled every config).
    os.environ.pop("FUSEDRES_TRITON_CONFIG", None)
    # cuDNN picks its fastest algorithm per shape, as training scripts ask it to (torchvision's
    # references do): every provider's cuDNN convolutions (eager's, cuda's, triton's backward)
    # run at their best; the choosing happens in the untimed first calls.
    torch.backends.cudnn.benchmark = True
    results = Results(args.out, "bench")
    budget = Budget(args.deadline, results)
    b = Bench(plan, results, budget)
    est = plan.estimates
    b.run("peaks", est["peaks"], b.peaks_)
    providers = b.usable(plan.bench_providers)
    for name in plan.bench_blocks:
        for mode in ("train", "eval"):
            b.run(f"block {name} {mode}", est[f"block_{mode}"],
                  lambda n=name, m=mode: b.block(n, m, providers, "main"))
    model_providers = [pr for pr in providers if pr.name in plan.model_providers]
    for mode in ("train", "eval"):
        b.run(f"model {mode}", est[f"model_{mode}"],
              lambda m=mode: b.model(m, model_providers, "main"))
    bn_providers = ["eager"] + [pr.backend for pr in providers if pr.backend != "eager"]
    for c, hw in plan.bn_shapes:
        b.run(f"bn kernels {c}x{hw}", est["bn"] / len(plan.bn_shapes),
              lambda c=c, hw=hw: b.bn(c, hw, bn_providers))
    for name in plan.conv_units:
        b.run(f"conv {name}", est["conv"] / len(plan.conv_units), lambda n=name: b.conv(n))
    b.run("profile", est["profile"], lambda: b.profile(plan.bench_blocks[0]))
    if not plan.compile:
        results.skip("torch.compile", "dry run: inductor needs a minute or more per graph on "
                                      "2 cores")
        return 1 if b.errors else 0
    compile_providers = [pr for pr in providers if pr.name in ("eager_cl", "triton", "cuda")]
    compile_providers.append(make_provider("compile"))
    # After the first compile its measured cost is the estimate of the next (a warm cache
    # makes it seconds, a cold one tens of seconds).
    estimate = est["compile_block"]
    for mode in ("train", "eval"):
        for name in plan.bench_blocks:
            t0 = time.perf_counter()
            if b.run(f"compile block {name} {mode}", estimate,
                     lambda n=name, m=mode: b.block(n, m, compile_providers, "compile")):
                estimate = time.perf_counter() - t0
    for mode in ("train", "eval"):
        b.run(f"compile model {mode}", est["compile_model"],
              lambda m=mode: b.model(m, [pr for pr in compile_providers
                                         if pr.name in plan.model_providers or pr.compiled],
                                     "compile"))
    return 1 if b.errors else 0
