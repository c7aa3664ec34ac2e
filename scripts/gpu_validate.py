"""The Python side of scripts/gpu_validate.sh: one subcommand per stage, results as JSON lines.

    python scripts/gpu_validate.py {info,warmup,warmup-compile,check,bench,summary} --out DIR
        [--dry-run] [--deadline EPOCH_SECONDS]

Every stage appends its results to ``DIR/results.jsonl`` the moment each exists: one JSON object
per line, written with a single ``write`` on a file opened for appending (so processes running
side by side never interleave within a line, and nothing waits in a buffer when a call is cut
off). Each record has ``kind``, ``stage`` and ``t`` (seconds since the run started); the kinds:

- ``machine``: GPU, driver, CUDA, torch, triton, CPU, the commit (the info stage, first);
- ``stage``: a stage's exit status, seconds, budget and estimate (written by the shell script);
- ``warm``: one warm-up task (what it compiled, the config, seconds);
- ``check``: one correctness case (scripts/gpu_validate_check.py), ``status`` pass or fail;
- ``bench``, ``peaks``, ``kernel``, ``profile``: measurements (scripts/gpu_validate_bench.py);
- ``skip``: something left out, with the reason (the budget, or what a dry run cannot do);
- ``error``: an exception, with the end of its traceback (the stage carries on).

The sizes of everything come from gpu_validate_common.Plan: ResNet-50's real shapes on a GPU,
tiny ones under ``--dry-run`` (the CPU, the Triton interpreter), so that CI runs this same code
end to end. Each stage ends by its deadline (``--deadline``, default the environment's
GPU_VALIDATE_DEADLINE, which the shell script sets): whatever does not fit in the time left is
skipped and recorded, rather than the stage being killed half-way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Optional

from gpu_validate_common import ROOT, Budget, Plan, Results, get_plan, log


# -- machine information ------------------------------------------------------------------------

def _run_text(cmd: list) -> Optional[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine_info() -> dict:
    """What a result must carry: GPU, driver, versions, CPU, the commit."""
    import torch

    from fusedres.report import _cpu_model

    info = {"python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "commit": _run_text(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]),
            "tree_changed": bool(_run_text(["git", "-C", ROOT, "status", "--porcelain",
                                            "--untracked-files=no"])),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not importable: {exc}"
    nvcc = _run_text(["nvcc", "--version"])
    info["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    info.update(_toolchain(torch))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count())
        smi = _run_text(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                         "--format=csv,noheader"])
        if smi:
            info["driver"], info["max_sm_clock"], info["power_limit"] = \
                [s.strip() for s in smi.splitlines()[0].split(",")]
    else:
        info["gpu"] = None
    return info


def _toolchain(torch) -> dict:
    """The C++ side the extension is built and loaded with (the first H200 run's build crashed
    in message-building code, cause unknown): the compiler cpp_extension calls, its version and
    default std::string ABI against torch's, and the C++ and OpenMP runtimes this process
    has loaded."""
    cxx = os.environ.get("CXX", "c++")
    version = _run_text([cxx, "--version"])
    try:
        macros = subprocess.run([cxx, "-x", "c++", "-E", "-dM", "-"], input="#include <string>\n",
                                capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        macros = ""
    default_abi = next((line.split()[-1] for line in macros.splitlines()
                        if line.startswith("#define _GLIBCXX_USE_CXX11_ABI ")), None)
    try:
        with open("/proc/self/maps") as f:
            loaded = sorted({line.split()[-1] for line in f
                             if "libstdc++" in line or "libgomp" in line or "libgcc_s" in line})
    except OSError:
        loaded = []
    return {"cxx": cxx, "cxx_version": version.splitlines()[0] if version else None,
            "cxx_default_cxx11_abi": default_abi,
            "torch_cxx11_abi": int(torch._C._GLIBCXX_USE_CXX11_ABI),
            "cxx_runtimes_loaded": loaded}


def cmd_info(args, plan: Plan) -> int:
    """Records the machine; writes the GPU's arch for the build into ``--env-file``.

    Returns 2 when a GPU run finds no CUDA device (nothing else can run then).
    """
    import torch

    import fusedres

    results = Results(args.out, "info")
    info = machine_info()
    info["backends"] = {k: list(v) for k, v in fusedres.available_backends().items()}
    info["dry_run"] = plan.dry_run
    results.write("machine", **info)
    print(json.dumps(info, indent=1), flush=True)
    arch = ""
    if torch.cuda.is_available():
        arch = "%d.%d" % torch.cuda.get_device_capability(0)
    if args.env_file:
        with open(args.env_file, "w") as f:
            f.write(f"GPU_ARCH={arch}\n")
    if not plan.dry_run and not torch.cuda.is_available():
        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device",
              flush=True)
        return 2
    return 0


# -- warm-up: fill Triton's and inductor's on-disk caches before anything is timed --------------

def _config_count() -> int:
    """The most configs a Triton kernel table of the benchmarks' bf16 path has for this GPU
    (sm_90 when there is none): autotuning compiles and times every one of them."""
    import torch

    from fusedres.kernels import bn, conv
    from fusedres.kernels._launch import arch_configs, device_arch

    arch = device_arch(torch.device("cuda")) if torch.cuda.is_available() else 90
    tables = (conv.CONV_CONFIGS, conv.CONV_FLAT_CONFIGS, bn.ELEMENTWISE_CONFIGS)
    return max(len(arch_configs(t, arch)) for t in tables)


def warm_tasks(plan: Plan) -> list:
    """Every (config, label, function) the timed stages will run on the triton backend.

    The correctness check runs config 0 (FUSEDRES_TRITON_CONFIG=0: autotuning every case of
    its matrix would time every config of every shape); the benchmarks autotune, so they need
    every config compiled. Triton's cache key holds the kernel, its constexprs, the dtypes and
    which integer arguments are divisible by 16, so the tasks run the real batch sizes: a
    smaller batch can change that divisibility (e.g. the number of statistics partials).
    """
    import gpu_validate_bench as bench
    import gpu_validate_check as check

    check_fns = [(f"check {label}", fn) for label, fn in check.warm_functions(plan)]
    bench_fns = [(f"bench {label}", fn) for label, fn in bench.warm_functions(plan)]
    configs = _config_count()
    if plan.dry_run:
        # The interpreter compiles nothing and ignores the config: one task of each stage shows
        # that the code runs (the bench's last, its convolutions, is the lightest).
        return [(0, *check_fns[0]), (0, *bench_fns[-1])]
    return [(0, *task) for task in check_fns] + [
        (config, *task) for config in range(configs) for task in bench_fns]


def cmd_warmup(args, plan: Plan) -> int:
    """Starts ``plan.warm_workers`` processes that share :func:`warm_tasks` and waits for them.

    Triton compiles in the calling process (one core each); its on-disk cache (~/.triton/cache)
    is shared, so the timed stages later load every kernel instead of compiling it.
    """
    workers = args.workers or plan.warm_workers
    procs = [subprocess.Popen([sys.executable, __file__, "warmup-worker", "--out", args.out,
                               "--index", str(i), "--workers", str(workers)]
                              + (["--dry-run"] if plan.dry_run else [])
                              + (["--deadline", str(args.deadline)] if args.deadline else []))
             for i in range(workers)]
    codes = [p.wait() for p in procs]
    log(f"warm-up workers ended with {codes}")
    return max(codes)


def cmd_warmup_worker(args, plan: Plan) -> int:
    """Runs every ``workers``-th warm-up task from ``index`` on."""
    results = Results(args.out, "warmup_triton")
    budget = Budget(args.deadline, results)
    tasks = warm_tasks(plan)[args.index::args.workers]
    log(f"worker {args.index}: {len(tasks)} tasks")
    for i, (config, label, fn) in enumerate(tasks):
        what = f"{label} config {config}"
        if not budget.fits(f"warm-up of {what} and the {len(tasks) - i - 1} after it",
                           plan.estimates["warm_task"]):
            break
        os.environ["FUSEDRES_TRITON_CONFIG"] = str(config)
        t0 = time.perf_counter()
        if results.guarded(what, fn):
            results.write("warm", what=label, config=config,
                          seconds=round(time.perf_counter() - t0, 2))
            log(f"worker {args.index}: {what} {time.perf_counter() - t0:.1f}s")
        _release_memory()
    return 0


def _release_memory() -> None:
    """Hands cached GPU memory back: the warm-up processes share the GPU with each other and
    with the check stage."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cmd_warmup_compile(args, plan: Plan) -> int:
    """Fills inductor's FX-graph and AOT-autograd caches (on disk, shared by processes) with
    the torch.compile graphs the benchmarks time last, in ``plan.compile_workers`` processes."""
    if args.index is None:
        procs = [subprocess.Popen([sys.executable, __file__, "warmup-compile", "--out", args.out,
                                   "--index", str(i), "--workers", str(plan.compile_workers)]
                                  + (["--deadline", str(args.deadline)] if args.deadline else []))
                 for i in range(plan.compile_workers)]
        return max([p.wait() for p in procs], default=0)
    import gpu_validate_bench as bench

    results = Results(args.out, "warmup_compile")
    budget = Budget(args.deadline, results)
    tasks = bench.compile_warm_functions(plan)[args.index::args.workers]
    for i, (label, fn) in enumerate(tasks):
        if not budget.fits(f"compile warm-up of {label} and the {len(tasks) - i - 1} after it",
                           plan.estimates["compile_block"]):
            break
        t0 = time.perf_counter()
        if results.guarded(f"compile {label}", fn):
            results.write("warm", what=f"compile {label}",
                          seconds=round(time.perf_counter() - t0, 2))
            log(f"compile {label}: {time.perf_counter() - t0:.1f}s")
        _release_memory()
    return 0


# -- entry point --------------------------------------------------------------------------------

def parse_args(argv: Optional[list] = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["info", "warmup", "warmup-worker", "warmup-compile",
                                        "check", "bench", "summary"])
    ap.add_argument("--out", required=True, help="results folder (results.jsonl, README.md)")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on the CPU, Triton interpreted (CI)")
    deadline = os.environ.get("GPU_VALIDATE_DEADLINE")
    ap.add_argument("--deadline", type=float, default=float(deadline) if deadline else None,
                    help="epoch seconds by which the stage must end (default: "
                         "$GPU_VALIDATE_DEADLINE)")
    ap.add_argument("--env-file", default=None, help="info: where to write GPU_ARCH=...")
    ap.add_argument("--index", type=int, default=None, help="warm-up worker index")
    ap.add_argument("--workers", type=int, default=None, help="warm-up worker count")
    return ap.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.command == "summary":  # reads the JSON lines of any run, this machine's or not
        import gpu_validate_summary
        return gpu_validate_summary.main(args.out)
    if args.dry_run:
        # Read once, when triton is first imported: before anything imports it.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    plan = get_plan(args.dry_run)
    commands = {"info": cmd_info, "warmup": cmd_warmup, "warmup-worker": cmd_warmup_worker,
                "warmup-compile": cmd_warmup_compile}
    if args.command == "check":
        import gpu_validate_check
        return gpu_validate_check.main(args, plan)
    if args.command == "bench":
        import gpu_validate_bench
        return gpu_validate_bench.main(args, plan)
    return commands[args.command](args, plan)


if __name__ == "__main__":
    sys.exit(main())
