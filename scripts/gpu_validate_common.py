"""What the stages of scripts/gpu_validate.sh share: the JSON-lines writer, the time budget,
and the :class:`Plan` (a GPU's sizes, or the dry run's).

See scripts/gpu_validate.py for the records and the stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_FILE = "results.jsonl"


# -- results ------------------------------------------------------------------------------------

class Results:
    """Appends records to ``out/results.jsonl``, one ``os.write`` per line.

    Args:
        out: the results folder.
        stage: the stage name written into every record.
    """

    def __init__(self, out: str, stage: str):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, RESULTS_FILE)
        self.stage = stage
        # The shell exports the run's start, so `t` is comparable across stages.
        self.start = float(os.environ.get("GPU_VALIDATE_START") or time.time())

    def write(self, kind: str, **fields) -> dict:
        """Appends one record and returns it."""
        record = {"kind": kind, "stage": self.stage, "t": round(time.time() - self.start, 2),
                  **fields}
        line = (json.dumps(record, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return record

    def skip(self, what: str, reason: str) -> None:
        log(f"skip {what}: {reason}")
        self.write("skip", what=what, reason=reason)

    def guarded(self, what: str, fn: Callable[[], object]) -> bool:
        """Runs ``fn``; an exception becomes an ``error`` record. Returns whether it ran clean."""
        try:
            fn()
            return True
        except Exception as exc:  # every failure is recorded and the stage goes on
            tail = traceback.format_exc().splitlines()[-12:]
            log(f"ERROR in {what}: {exc!r}")
            self.write("error", what=what, error=repr(exc)[:500], traceback=tail)
            return False


def log(msg: str) -> None:
    """A progress line on stdout (the stage's log file), flushed."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Budget:
    """The seconds left until a stage's deadline.

    Args:
        deadline: epoch seconds by which the stage must have ended; None: no limit.
        results: where skips are recorded.
    """

    def __init__(self, deadline: Optional[float], results: Results):
        self.deadline = deadline
        self.results = results

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def fits(self, what: str, estimate_s: float) -> bool:
        """True when ``estimate_s`` seconds fit in what is left; else records a skip."""
        left = self.left()
        if left >= estimate_s:
            return True
        self.results.skip(what, f"budget: {left:.0f} s of the stage left, it needs about "
                                f"{estimate_s:.0f} s")
        return False


# -- what runs at which size --------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """Sizes, dtypes, backends and budgets of one run: a GPU's, or the dry run's on a CPU.

    Unit and block shapes are not listed here: they come from fusedres.traffic.model_blocks
    (ResNet-50's and ResNet-18's real geometry), channels divided by ``channel_div``.

    Attributes:
        check_units: unit names of model_blocks (``conv1`` is the stem; ``layer2.0.conv2``...)
            to check; None: the stem and every unit of each stage's first block.
        check_blocks, bench_blocks: ``(arch, block name)`` / block names of ResNet-50.
        net_arch: the whole network of the checks and the model timings (a fusedres.models
            builder name).
        estimates: seconds an item is expected to take on this machine, by item kind; an item
            starts only when its estimate fits in what is left of its stage's budget.
    """

    dry_run: bool
    device: str
    image: int
    channel_div: int
    check_batch: int
    check_dtypes: tuple
    check_backends: tuple
    check_units: Optional[tuple]
    check_blocks: tuple
    net_arch: str
    net_batch: int
    net_image: int
    net_dtypes: tuple
    net_backends: tuple
    bench_dtype: str
    bench_batch: int
    bench_blocks: tuple
    bench_providers: tuple
    graph_providers: tuple
    model_batch: int
    model_image: int
    model_providers: tuple
    bn_shapes: tuple
    conv_units: tuple
    copy_bytes: int
    matmul_size: int
    rounds: int
    warmup: int
    compile: bool
    warm_workers: int
    compile_workers: int
    estimates: dict

    @property
    def fused_check_backends(self) -> tuple:
        return tuple(b for b in self.check_backends if b != "eager")


# ResNet-50's first block of each stage holds every unit geometry of the stage (the reduce 1x1,
# the 3x3 (stride 2 after layer1), the expand 1x1 with the residual, the downsample); the
# identity blocks add one more: a reduce 1x1 from 4x the channels (checked inside the blocks).
GPU_PLAN = Plan(
    dry_run=False, device="cuda", image=224, channel_div=1,
    check_batch=32, check_dtypes=("bfloat16", "float32"),
    check_backends=("eager", "triton", "cuda"), check_units=None,
    check_blocks=(("resnet50", "layer1.0"), ("resnet50", "layer2.0"), ("resnet50", "layer3.0"),
                  ("resnet50", "layer3.1"), ("resnet50", "layer4.0"), ("resnet18", "layer1.0"),
                  ("resnet18", "layer2.0")),
    net_arch="resnet50",
    # 128 px: layer4 is 4x4, 256 values per channel for BatchNorm at batch 16; the float64
    # oracle of this network costs ~64 GFLOP (the old script's 16 x 224 px oracle cost ~200).
    net_batch=16, net_image=128, net_dtypes=("bfloat16", "float32"),
    net_backends=("triton", "cuda"),
    bench_dtype="bfloat16", bench_batch=128,
    # identity blocks first: 12 of ResNet-50's 16 blocks are of that kind
    bench_blocks=("layer1.1", "layer2.1", "layer3.1", "layer4.1",
                  "layer1.0", "layer2.0", "layer3.0", "layer4.0"),
    bench_providers=("eager_cl", "triton", "cuda"),
    # Also timed as one CUDA graph per step (host launch cost gone): the first H200 run found
    # triton's steps host-bound (gpu_validate_bench.cuda_graphed).
    graph_providers=("eager_cl", "triton", "cuda"),
    model_batch=256, model_image=224, model_providers=("eager_cl", "triton", "cuda"),
    bn_shapes=((256, 56), (512, 28), (1024, 14), (2048, 7)),
    conv_units=("layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv1", "layer4.1.conv2"),
    copy_bytes=2**30, matmul_size=8192, rounds=10, warmup=3, compile=True,
    warm_workers=8, compile_workers=4,
    # Seconds on an H200 (16 host cores), guessed from FLOPs, bytes and launch counts; the
    # records' `seconds` fields say what they really took.
    estimates={"unit": 3, "block_check": 4, "net_train": 15, "net_eval": 8,
               # blocks and the model: each provider also captured and replayed as a graph
               "peaks": 3, "block_train": 15, "block_eval": 8, "model_train": 70,
               "model_eval": 30, "bn": 12, "conv": 8, "profile": 8,
               "compile_block": 25, "compile_model": 80, "warm_task": 10},
)

# The dry run: the same stages on a CPU with 2 cores, in about a minute and a half. Channels /16
# and 32 px images keep the Triton interpreter (one Python step per program and tile, ~0.5 s a
# unit; 5 s for the stem's 7x7 over 16x16 outputs, left out) to seconds; bf16 runs as fp16 in
# the checks (the interpreter's bf16 tl.dot is wrong, docs/design.md section 6) and the timings run
# fp32 (CPU convolutions in fp16 take minutes for a ResNet-50); the cpu backend (the same
# torch.ops.fusedres ops as cuda) stands in for cuda.
DRY_PLAN = dataclasses.replace(
    GPU_PLAN, dry_run=True, device="cpu", image=32, channel_div=16,
    check_batch=2, check_dtypes=("float16", "float32"), check_backends=("eager", "triton", "cpu"),
    # 3x3/2; + residual; no ReLU
    check_units=("layer2.0.conv2", "layer2.0.conv3", "layer2.0.downsample"),
    check_blocks=(("resnet50", "layer2.0"), ("resnet18", "layer1.0")),
    # The interpreter needs minutes for a whole network: the cpu backend runs it, and
    # ResNet-18 (a third of ResNet-50's ops) keeps the CPU's part short.
    net_arch="resnet18", net_batch=2, net_image=64, net_dtypes=("float32",), net_backends=("cpu",),
    bench_dtype="float32", bench_batch=2, bench_blocks=("layer2.0",),
    bench_providers=("eager_cl", "triton", "cpu_cl"), graph_providers=(),
    model_batch=2, model_image=32, model_providers=("eager_cl", "cpu_cl"),
    bn_shapes=((64, 8),), conv_units=("layer2.1.conv2",),
    copy_bytes=2**24, matmul_size=256, rounds=2, warmup=1, compile=False,
    warm_workers=2, compile_workers=0,
    estimates={key: 0 for key in GPU_PLAN.estimates},
)


def backend_status(name: str, device_type: str) -> tuple[bool, str]:
    """(whether fusedres's backend ``name`` runs ``device_type`` tensors here, why or why not)."""
    import fusedres

    ok, why = fusedres.available_backends()[name]
    if ok and device_type not in fusedres.get_backend(name).device_types:
        return False, f"does not run {device_type} tensors"
    return ok, why


def get_plan(dry_run: bool) -> Plan:
    return DRY_PLAN if dry_run else GPU_PLAN


def units(plan: Plan, arch: str, batch: int):
    """Every unit of ``arch`` at ``batch``, the plan's image and channels: {name: traffic.Unit}."""
    from fusedres import traffic

    found = {}
    for block in traffic.model_blocks(arch, batch, plan.image):
        for u in block:
            cin = u.cin if u.name == "conv1" else u.cin // plan.channel_div
            found[u.name] = dataclasses.replace(u, cin=cin, cout=u.cout // plan.channel_div)
    return found


@dataclass(frozen=True)
class BlockSpec:
    """One torchvision block: ``kind`` (basic/bottleneck), its arguments and input size."""

    arch: str
    name: str
    kind: str
    inplanes: int
    planes: int
    stride: int
    size: int

    def build(self):
        """The eager block (fusedres.reference), with a downsample where torchvision has one."""
        import torch.nn as nn

        from fusedres import reference

        cls = reference.Bottleneck if self.kind == "bottleneck" else reference.BasicBlock
        out = self.planes * cls.expansion
        downsample = None
        if self.stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(reference.conv1x1(self.inplanes, out, self.stride),
                                       nn.BatchNorm2d(out))
        return cls(self.inplanes, self.planes, self.stride, downsample)


def block_spec(plan: Plan, arch: str, name: str) -> BlockSpec:
    """The block ``name`` (``layer2.0``) of ``arch`` at the plan's image size and channels."""
    found = units(plan, arch, 1)
    conv1 = found[f"{name}.conv1"]
    kind = "basic" if f"{name}.conv3" not in found else "bottleneck"
    stride = max(u.stride for key, u in found.items() if key.startswith(name + "."))
    return BlockSpec(arch, name, kind, conv1.cin, conv1.cout, stride, conv1.h)
