"""The correctness stage of scripts/gpu_validate.sh: every backend against eager PyTorch and a
float64 oracle, under the test suite's rule (tests/conftest.py: a fused result's error against
the oracle is at most twice eager's in the same dtype plus an atol).

Three groups, in this order (each case one ``check`` record per dtype and backend):

- ``unit``: one conv -> BN -> (+ residual) -> ReLU unit at every ResNet-50 stage geometry (the
  stem and the four units of each stage's first block), training (forward with batch
  statistics, backward, running statistics) and eval (forward and backward with the running
  statistics); outputs by max error, as the unit tests judge them;
- ``block``: ResNet-50 Bottlenecks and ResNet-18 BasicBlocks, channels_last, the same two
  modes; gradients by relative L2 error (inner ReLU kinks make single entries noise);
- ``net_train`` and ``net_eval``: a whole ResNet-50, one training forward + backward
  (fusedres.report.check_against_eager: logits and five gradients) and an eval forward with
  calibrated running statistics, relative L2 error.

fp32 runs without TF32 on both sides (as tests/kernels/conftest.py has it), and the Triton
kernels with their first config (FUSEDRES_TRITON_CONFIG=0, set by the shell script): autotuning
every case would time every config of every shape.

The oracle runs once per case and serves every dtype: parameters, buffers and inputs are drawn
exactly representable in the narrowest dtype, so each dtype's run starts from the same values.
"""

from __future__ import annotations

import copy
import itertools
import os
import sys
import time
import zlib
from typing import Callable, Optional

import torch
import torch.nn as nn

import fusedres
from fusedres import FusedConvBNReLU, reference
from fusedres.report import (as_input, autocast, build_model, check_against_eager,
                             make_provider)
from gpu_validate_common import (ROOT, Budget, Plan, Results, backend_status, block_spec, log,
                                 units)

# The tolerance rule and the unit harness of the test suite, so that this stage judges exactly
# as tests/kernels/test_gpu_resnet50.py does.
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import assert_oracle_close, max_abs_err, rel_l2_err  # noqa: E402
from kernels.test_triton_backend import KINK_BAND, _randomize_bn, _run  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MODES = (("train", True), ("eval", False))


def _seed(name: str) -> None:
    torch.manual_seed(zlib.crc32(name.encode()))


def _representable(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Rounds every float parameter and buffer of ``module`` to a value ``dtype`` holds."""
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))
    return module


def _judge(got: dict, ref: dict, exact: dict, grad_norm: str,
           out_norm: str = "max") -> tuple[bool, dict]:
    """Every tensor of ``got`` against the oracle ``exact`` by the test suite's rule.

    Args:
        got, ref, exact: {name: tensor} of the fused run, eager's in the same dtype, the oracle.
        grad_norm, out_norm: the rule's norm (``max`` or ``rel_l2``) for gradients (dx,
            dresidual, d.<parameter>) and for everything else.

    Returns (all ok, {name: {"err", "err_eager", "norm", "ok"[, "why"]}}); integer buffers
    (num_batches_tracked) must equal the oracle's.
    """
    tensors, all_ok = {}, True
    for key, want in exact.items():
        have = got.get(key)
        if have is None:
            tensors[key] = {"ok": False, "why": "not computed"}
            all_ok = False
            continue
        if not want.is_floating_point():
            ok = torch.equal(have.cpu(), want.cpu())
            tensors[key] = {"ok": ok, "norm": "equal"}
            all_ok &= ok
            continue
        norm = grad_norm if key in ("dx", "dresidual") or key.startswith("d.") else out_norm
        err_fn = rel_l2_err if norm == "rel_l2" else max_abs_err
        entry = {"err": err_fn(have, want), "err_eager": err_fn(ref[key], want), "norm": norm,
                 "ok": True}
        try:
            assert_oracle_close(have, ref[key], want, name=key, norm=norm)
        except AssertionError as exc:
            entry.update(ok=False, why=str(exc))
            all_ok = False
        tensors[key] = entry
    return all_ok, tensors


class Checker:
    """Runs cases and records them; counts failures.

    Args:
        plan: sizes, dtypes and backends.
        results: where records go; None for warm-up runs (the fused modules only).
        backends: the fused backends to run (usable ones).
    """

    def __init__(self, plan: Plan, results: Optional[Results], backends: tuple):
        self.plan = plan
        self.results = results
        self.backends = backends
        self.device = torch.device(plan.device)
        self.failed = 0

    def case(self, group: str, name: str, eager: nn.Module, make_fused: Callable,
             x: torch.Tensor, residual: Optional[torch.Tensor], grad_norm: str, **labels):
        """One case in both modes, every dtype and backend.

        Args:
            eager: the plain-PyTorch module (float32, on the device); make_fused(backend)
                returns a fused twin holding the same parameters and buffers.
            x, residual: float32 inputs (residual None for blocks).
        """
        low = DTYPES[self.plan.check_dtypes[0]]
        _representable(eager, low)
        x64 = x.to(low).double()
        res64 = None if residual is None else residual.to(low).double()
        # The widest kink band of the dtypes: every dtype's run then shares one dy.
        band = max(KINK_BAND[DTYPES[d]] for d in self.plan.check_dtypes)
        # Inner kinks: the narrowest band (float32's), see _inner_kink_reach.
        inner_band = min(KINK_BAND[DTYPES[d]] for d in self.plan.check_dtypes)
        for mode, training in MODES:
            t0 = time.perf_counter()
            exact = None
            if self.results is not None:
                # NCHW float64: cuDNN's float64 kernels are NCHW ones.
                oracle = reference.upcast(eager).to(memory_format=torch.contiguous_format)
                oracle.train(training)
                x64c, res64c = (None if t is None else t.contiguous() for t in (x64, res64))
                with torch.no_grad():
                    # a copy: the training forward moves the running statistics
                    y64, reach = _inner_kink_reach(copy.deepcopy(oracle), _args(x64c, res64c),
                                                   inner_band)
                dy = torch.randn(y64.shape, dtype=torch.float64, device=self.device)
                dy = dy.masked_fill(y64.abs() < band, 0.0)
                if reach is not None:
                    dy = dy.masked_fill(reach, 0.0)
                    labels["inner_kink_pixels"] = round(reach.double().mean().item(), 5)
                exact = _run(oracle, x64c, res64c, dy)
            oracle_s = time.perf_counter() - t0
            for dname in self.plan.check_dtypes:
                dtype = DTYPES[dname]
                cast = (lambda t: None if t is None else t.to(dtype))
                ref = None
                if exact is not None:
                    ref = _run(copy.deepcopy(eager).to(dtype).train(training), cast(x64),
                               cast(res64), cast(dy))
                for backend in self.backends:
                    t1 = time.perf_counter()
                    fused = make_fused(backend).to(dtype).train(training)
                    if exact is None:  # warm-up: every kernel runs once, nothing is judged
                        xs, rs = (None if t is None else cast(t).requires_grad_()
                                  for t in (x64, res64))
                        y = fused(*_args(xs, rs))
                        y.backward(torch.randn_like(y))
                        continue
                    got = _run(fused, cast(x64), cast(res64), cast(dy))
                    ok, tensors = _judge(got, ref, exact, grad_norm)
                    self.failed += not ok
                    self.results.write(
                        "check", group=group, name=name, backend=backend, dtype=dname,
                        mode=mode, status="pass" if ok else "fail", tensors=tensors,
                        oracle_s=round(oracle_s, 3),
                        seconds=round(time.perf_counter() - t1, 3), **labels)
                    if not ok:
                        bad = [k for k, v in tensors.items() if not v["ok"]]
                        log(f"FAIL {group} {name} {backend} {dname} {mode}: {bad}")

    def unit(self, u) -> None:
        """A unit of fusedres.traffic (geometry, residual, ReLU) at the plan's batch."""
        _seed(u.name)
        eager = reference.ConvBNAct(u.cin, u.cout, u.kernel, u.stride, u.padding,
                                    groups=u.groups, relu=u.relu)
        _randomize_bn(eager.bn)
        eager = eager.to(self.device)

        def make_fused(backend):
            fused = FusedConvBNReLU(u.cin, u.cout, u.kernel, u.stride, u.padding,
                                    groups=u.groups, relu=u.relu, backend=backend)
            fused.to(self.device).load_state_dict(eager.state_dict())
            return fused

        x = torch.randn(u.n, u.cin, u.h, u.w, device=self.device)
        x = x.to(memory_format=torch.channels_last)
        res = (torch.randn(u.n, u.cout, u.ho, u.wo, device=self.device) if u.residual
               else None)
        shape = (f"{u.cin}->{u.cout} {u.kernel}x{u.kernel}/{u.stride} {u.h}px"
                 + (" +res" if u.residual else "") + ("" if u.relu else " no-relu"))
        self.case("unit", u.name, eager, make_fused, x, res, "max", shape=shape, batch=u.n)

    def block(self, arch: str, name: str) -> None:
        """Block ``name`` of ``arch``, model and input channels_last, at the plan's batch."""
        spec = block_spec(self.plan, arch, name)
        _seed(arch + name)
        eager = spec.build()
        for m in eager.modules():
            if isinstance(m, nn.BatchNorm2d):
                _randomize_bn(m)
        eager = eager.to(self.device).to(memory_format=torch.channels_last)

        def make_fused(backend):
            return fusedres.convert(copy.deepcopy(eager), backend)

        x = torch.randn(self.plan.check_batch, spec.inplanes, spec.size, spec.size,
                        device=self.device).to(memory_format=torch.channels_last)
        shape = f"{spec.kind} {spec.inplanes}->{spec.planes} s{spec.stride} {spec.size}px"
        self.case("block", f"{arch} {name}", eager, make_fused, x, None, "rel_l2", shape=shape,
                  batch=self.plan.check_batch)

    def net_train(self, dname: str, backends: tuple) -> None:
        """A whole network's training forward + backward (report.check_against_eager)."""
        p = self.plan
        t0 = time.perf_counter()
        found = check_against_eager(p.net_arch, [make_provider(b) for b in backends],
                                    self.device, DTYPES[dname], p.net_batch, p.net_image)
        for backend, chk in found.items():
            tensors = {k: {"err": e["rel_l2"], "err_eager": e["rel_l2_eager"],
                           "bound": e["bound"], "norm": "rel_l2", "ok": e["ok"]}
                       for k, e in chk["tensors"].items()}
            self.failed += not chk["ok"]
            self.results.write("check", group="net_train", name=p.net_arch, backend=backend,
                               dtype=dname, mode="train", status="pass" if chk["ok"] else "fail",
                               tensors=tensors, batch=p.net_batch, image=p.net_image,
                               seconds=round(time.perf_counter() - t0, 3))

    def net_eval(self, dname: str, backends: tuple) -> None:
        """A whole network's eval forward, random BN affine and calibrated running statistics."""
        p, dtype = self.plan, DTYPES[dname]
        _seed(f"net_eval {dname}")
        base = _calibrated_net(p, self.device)
        x = torch.randn(p.net_batch, 3, p.net_image, p.net_image, device=self.device)
        t0 = time.perf_counter()
        with reference.oracle_convolutions(self.device), torch.inference_mode():
            eager = build_model(p.net_arch, make_provider("eager"), self.device, base).eval()
            with autocast(self.device, dtype):
                ref = eager(x)
            exact = reference.upcast(eager)(x.double())
            for backend in backends:
                provider = make_provider(backend)
                model = build_model(p.net_arch, provider, self.device, base).eval()
                with autocast(self.device, dtype):
                    got = model(as_input(x, provider))
                # a whole network is judged by relative L2 (tests/conftest.py), logits too
                ok, tensors = _judge({"logits": got}, {"logits": ref}, {"logits": exact},
                                     "rel_l2", out_norm="rel_l2")
                self.failed += not ok
                self.results.write("check", group="net_eval", name=p.net_arch, backend=backend,
                                   dtype=dname, mode="eval", status="pass" if ok else "fail",
                                   tensors=tensors, batch=p.net_batch, image=p.net_image,
                                   seconds=round(time.perf_counter() - t0, 3))


def _inner_kink_reach(block: nn.Module, args: tuple,
                      band: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Runs ``block`` and finds the output pixels that an inner ReLU's kink reaches.

    A block (fusedres.reference's BasicBlock or Bottleneck: conv1 .. convL, a ReLU after each
    of bn1 .. bn(L-1), the last one after the residual add) has inner ReLUs whose
    pre-activations, within ``band`` of 0, may land on either side in a fused run (eval folds
    BN into the weights; training sums in another order), which moves every gradient upstream
    of them (docs/design.md section 6). The output dy only masks the last kink. Zeroing dy at
    every output pixel (all channels) whose receptive field through conv(i+1) .. convL holds
    such an element makes the gradient reaching it zero, so a flip there multiplies a zero: in
    eval exactly; in training BN's batch statistics still carry a channel mean of dy to it.

    Returns (the block's output, a bool mask [N, 1, Ho, Wo] or None for a single unit).
    """
    if not hasattr(block, "conv1"):
        return block(*args), None
    depth = sum(1 for name, _ in block.named_children() if name.startswith("conv"))
    near = {}
    hooks = [getattr(block, f"bn{i}").register_forward_hook(
        lambda _m, _i, out, i=i: near.__setitem__(i, (out.abs() < band).any(1, keepdim=True)))
        for i in range(1, depth)]
    try:
        y = block(*args)
    finally:
        for h in hooks:
            h.remove()
    reach = torch.zeros_like(y[:, :1], dtype=torch.bool)
    for i, mask in near.items():
        spread = mask.double()
        for conv in (getattr(block, f"conv{j}") for j in range(i + 1, depth + 1)):
            window = torch.ones(1, 1, *conv.kernel_size, dtype=spread.dtype,
                                device=spread.device)
            spread = torch.nn.functional.conv2d(spread, window, None, conv.stride, conv.padding,
                                                conv.dilation)
        reach |= spread > 0
    return y, reach


def _args(x, residual) -> tuple:
    return (x,) if residual is None else (x, residual)


def _calibrated_net(plan: Plan, device: torch.device) -> nn.Module:
    """The plan's network with random BN affine parameters and running statistics set to one
    batch's (momentum None: a cumulative average, so one forward sets them), so that eval's
    scale and shift are neither identities nor out of proportion to the activations."""
    model = fusedres.to_eager(getattr(fusedres.models, plan.net_arch)()).to(device)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        _randomize_bn(m)
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(plan.net_batch, 3, plan.net_image, plan.net_image,
                                  device=device))
    for m in bns:
        m.momentum = 0.1
    return model.cpu()


def _net_warm(plan: Plan, dname: str) -> None:
    """The triton network of the net checks, one training forward + backward and one eval."""
    device, dtype = torch.device(plan.device), DTYPES[dname]
    provider = make_provider("triton")
    model = build_model(plan.net_arch, provider, device)
    x = as_input(torch.randn(plan.net_batch, 3, plan.net_image, plan.net_image,
                             device=device), provider)
    with autocast(device, dtype):
        out = model.train()(x)
    out.float().sum().backward()
    with torch.inference_mode(), autocast(device, dtype):
        model.eval()(x)


def _unit_list(plan: Plan) -> list:
    found = units(plan, "resnet50", plan.check_batch)
    if plan.check_units is not None:
        return [found[name] for name in plan.check_units]
    # the stem, then the four units of each stage's first block
    return [u for name, u in found.items() if name == "conv1" or ".0." in name]


def warm_functions(plan: Plan) -> list:
    """(label, function) for every triton kernel variant this stage runs, for the warm-up."""
    no_tf32()
    checker = Checker(plan, None, ("triton",))
    fns = [(f"unit {u.name}", lambda u=u: checker.unit(u)) for u in _unit_list(plan)]
    fns += [(f"block {arch} {name}", lambda a=arch, n=name: checker.block(a, n))
            for arch, name in plan.check_blocks]
    if "triton" in plan.net_backends:
        fns += [(f"net {d}", lambda d=d: _net_warm(plan, d)) for d in plan.net_dtypes]
    return fns


def no_tf32() -> None:
    """fp32 convolutions in full fp32, cuDNN's and the triton conv's (which follows cuDNN's
    flag), as tests/kernels/conftest.py runs them: with TF32 the 2x-eager rule would compare
    unlike roundings."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _usable(plan: Plan, results: Results) -> tuple:
    """The plan's fused backends usable here; the others are recorded as failed checks (a GPU
    run exists to show every backend correct)."""
    usable = []
    for name in plan.fused_check_backends:
        ok, why = backend_status(name, plan.device)
        if ok:
            usable.append(name)
        else:
            results.write("check", group="backend", name=name, backend=name, status="fail",
                          tensors={}, why=f"unusable: {why}")
            log(f"FAIL backend {name} unusable: {why}")
    return tuple(usable)


def main(args, plan: Plan) -> int:
    """The stage; exit status 1 when a check failed."""
    results = Results(args.out, "check")
    budget = Budget(args.deadline, results)
    no_tf32()
    backends = _usable(plan, results)
    checker = Checker(plan, results, ("eager",) + backends if "eager" in plan.check_backends
                      else backends)
    checker.failed += len(plan.fused_check_backends) - len(backends)
    # An item starts when the larger of its estimate and the longest such item so far fits (a
    # slow float64 oracle then shows in the first unit, not in a stage cut off by `timeout`).
    est = dict(plan.estimates)

    def run(what: str, key: str, fn) -> None:
        if budget.fits(what, est[key]):
            log(what)
            t0 = time.perf_counter()
            checker.failed += not results.guarded(what, fn)
            est[key] = max(est[key], time.perf_counter() - t0)

    for u in _unit_list(plan):
        run(f"check unit {u.name}", "unit", lambda u=u: checker.unit(u))
    for arch, name in plan.check_blocks:
        run(f"check block {arch} {name}", "block_check",
            lambda a=arch, n=name: checker.block(a, n))
    net = tuple(b for b in plan.net_backends if b in backends)
    for dname in plan.net_dtypes:
        if net:
            run(f"check net_train {dname}", "net_train", lambda d=dname: checker.net_train(d, net))
            run(f"check net_eval {dname}", "net_eval", lambda d=dname: checker.net_eval(d, net))
    # Only the dry run leaves a backend out: its Triton interpreter would need minutes.
    for backend in set(plan.fused_check_backends) - set(plan.net_backends):
        results.skip(f"check net {backend}", "dry run: the Triton interpreter would need "
                                              "minutes for a whole network")
    log(f"{checker.failed} failed")
    return 1 if checker.failed else 0
