"""Fused models in the PyTorch ecosystem: autocast + GradScaler, torch.compile, torch.export,
activation checkpointing, torch.func transforms and forward-mode AD, torch.fx tracing,
state_dict checkpoints and deterministic training, each compared with
the eager twin of the same model (fusedres.to_eager) or the float64 oracle."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import fusedres
from fusedres import reference

from conftest import ATOL, CPU_FUSED_BACKENDS, assert_oracle_close
from nets import assert_models_close, fused_eager_pair, train_step


# -- autocast and GradScaler ------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_autocast_leaves_float64_alone(backend):
    """Autocast casts only lower-precision-eligible tensors: a float64 model stays float64,
    fused as in eager."""
    fused, eager = (m.double() for m in fused_eager_pair(backend))
    x, target = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_f = train_step(fused, x, target)
        y_e = train_step(eager, x, target)
    assert y_f.dtype == y_e.dtype == torch.float64
    torch.testing.assert_close(y_f, y_e, rtol=1e-10, atol=ATOL[torch.float64])
    assert_models_close(fused, eager, rtol=1e-9, what="float64 under autocast:")


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_eager(backend, dtype):
    """CPU autocast (bf16 and fp16) through the fused units: output dtype, outputs, gradients
    and running statistics within docs/design.md's rule against the fp64 oracle."""
    fused, eager = fused_eager_pair(backend)
    oracle = reference.upcast(eager)
    x = torch.randn(4, 3, 16, 16)
    target = torch.randn(4, 5)
    with torch.autocast("cpu", dtype=dtype):
        y_f = train_step(fused, x, target)
        y_e = train_step(eager, x, target)
    y_o = train_step(oracle, x.double(), target.double())
    assert y_f.dtype == y_e.dtype
    assert_oracle_close(y_f.float(), y_e.float(), y_o, "logits", atol=ATOL[dtype])
    for (name, p), q, r in zip(fused.named_parameters(), eager.parameters(), oracle.parameters()):
        assert_oracle_close(p.grad, q.grad, r.grad, f"grad {name}", atol=ATOL[dtype])
    for (name, u), v, w in zip(fused.named_buffers(), eager.buffers(), oracle.buffers()):
        if u.is_floating_point():
            assert_oracle_close(u, v, w, name, atol=ATOL[dtype])


def _train_steps(model, amp: bool, steps: int = 4):
    """SGD steps with fp16 autocast + GradScaler (amp) or in the model's own dtype.

    Returns:
        The scaler's scale after each step (1.0 without amp).
    """
    dtype = next(model.parameters()).dtype
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=amp)
    gen = torch.Generator().manual_seed(1)
    scales = []
    for _ in range(steps):
        x = torch.randn(8, 3, 16, 16, generator=gen).to(dtype)
        y = torch.randint(0, 5, (8,), generator=gen)
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x).to(dtype), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_grad_scaler_training_fp16(backend):
    """fp16 autocast + torch.amp.GradScaler("cpu"), 4 SGD steps: the same scale decisions as
    eager, and parameters within docs/design.md's rule against an fp64 run without autocast (training
    amplifies fp16 rounding, so the bound is eager fp16's own distance from fp64)."""
    fused, eager = fused_eager_pair(backend)
    oracle = reference.upcast(eager)
    assert _train_steps(fused, amp=True) == _train_steps(eager, amp=True)
    _train_steps(oracle, amp=False)
    for (name, p), q, r in zip(fused.named_parameters(), eager.parameters(), oracle.parameters()):
        assert_oracle_close(p.detach(), q.detach(), r.detach(), name, atol=ATOL[torch.float16])


# -- torch.compile and torch.export -----------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_train_and_eval(backend, compiler):
    """fullgraph=True (a graph break raises) in training (forward + backward, two calls so the
    momentum=None running average is not baked in as a constant) and in eval mode."""
    torch._dynamo.reset()
    fused, eager = fused_eager_pair(backend)
    compiled = torch.compile(fused, fullgraph=True, backend=compiler)
    x = torch.randn(4, 3, 16, 16)
    target = torch.randn(4, 5)
    for _ in range(2):
        y_c = train_step(compiled, x, target)
        y_e = train_step(eager, x, target)
        torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)
    assert_models_close(fused, eager, what=f"compiled ({compiler}) train")
    fused.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_warns_nothing_about_fusedres(backend, mode, monkeypatch):
    """torch.compile of a fused model raises no warning that points at fusedres's code. Dynamo
    warns of every functools cache it traces through: one sat in the block op's backward, one in
    the eps check of a unit with eps = 0 in eval (where this torch's nn takes it)."""
    import warnings

    from fusedres.ops.unit import NN_TAKES_ZERO_EPS_WITH_RUNNING_STATS

    # Dynamo warns each message once per process: forget what earlier tests triggered.
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set(), raising=False)
    torch._dynamo.reset()
    fused, eager = fused_eager_pair(backend)
    x = torch.randn(4, 3, 16, 16)
    if mode == "eval":
        fused.eval()
        eager.eval()
        for net in (fused, eager):
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d) and NN_TAKES_ZERO_EPS_WITH_RUNNING_STATS:
                    m.eps = 0.0
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode == "train":
            target = torch.randn(4, 5)
            torch.testing.assert_close(train_step(compiled, x, target),
                                       train_step(eager, x, target), rtol=1e-4, atol=1e-5)
        else:
            with torch.no_grad():
                torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    about_fusedres = [str(w.message) for w in caught
                      if "fusedres" in str(w.message) or "fusedres" in w.filename]
    assert not about_fusedres, about_fusedres

@pytest.mark.slow
def test_compile_resnet18_inductor():
    """The whole fused resnet18 (32x32, batch 2) under inductor, fullgraph, train fwd + bwd."""
    torch._dynamo.reset()
    backend = "cpu" if fusedres.available_backends()["cpu"][0] else "torch_ops"
    torch.manual_seed(0)
    fused = fusedres.models.resnet18(num_classes=10, backend=backend)
    eager = fusedres.to_eager(copy.deepcopy(fused))
    # Batch 4 at 64x64 keeps 16 values per channel in layer4's BatchNorm; at 32x32 and batch 2
    # there would be 2, whose near-zero variances make gradients ill-conditioned in any backend.
    x = torch.randn(4, 3, 64, 64)
    target = torch.randn(4, 10)
    y_c = train_step(torch.compile(fused, fullgraph=True), x, target)
    y_e = train_step(eager, x, target)
    torch.testing.assert_close(y_c, y_e, rtol=1e-3, atol=1e-4)
    assert_models_close(fused, eager, rtol=1e-3, what="compiled resnet18")


def test_compile_fullgraph_eval_after_an_eager_plan():
    """A FusedResNet whose eager eval calls made its whole-model plan (and the plan's state
    watch) still compiles with fullgraph=True: the traced forward leaves the plan alone."""
    torch._dynamo.reset()
    backend = "cpu" if fusedres.available_backends()["cpu"][0] else "torch_ops"
    torch.manual_seed(0)
    fused = fusedres.models.resnet18(num_classes=10, backend=backend).eval()
    eager = fusedres.to_eager(copy.deepcopy(fused)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused(x)
        fused(x)  # from the plan
        out = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(out, eager(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_export_eval_model(backend):
    """torch.export of an eval-mode fused model: the exported program gives the same logits."""
    fused, eager = fused_eager_pair(backend)
    x = torch.randn(4, 3, 16, 16)
    train_step(fused, x, torch.randn(4, 5))  # non-trivial running statistics
    fused.eval()
    eager.load_state_dict(fused.state_dict())
    eager.eval()
    program = torch.export.export(fused, (x,))
    x2 = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(program.module()(x2), eager(x2), rtol=1e-5, atol=1e-6)


# -- activation checkpointing ----------------------------------------------------------------

class _Checkpointed(nn.Module):
    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net

    def forward(self, x):
        for i, block in enumerate(self.net):
            x = checkpoint(block, x, use_reentrant=False) if i < 3 else block(x)
        return x


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("early_stop", [True, False])
def test_activation_checkpointing(backend, early_stop):
    """use_reentrant=False checkpoints over the fused units and blocks give eager's gradients.

    Running statistics: a full recomputation updates them a second time, in eager as well, and
    then they match eager's. With early stop (PyTorch's default) the recomputation halts once
    the region's last saved tensor exists; eager BatchNorm updates its statistics inside the op,
    before that point, but a fused unit updates them after its autograd Function returns, so the
    last unit of each checkpointed region is updated once instead of twice. Only the full
    recomputation is compared for buffers.
    """
    fused, eager = fused_eager_pair(backend)
    plain = copy.deepcopy(eager)
    x = torch.randn(4, 3, 16, 16)
    target = torch.randn(4, 5)
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        train_step(_Checkpointed(fused), x, target)
        train_step(_Checkpointed(eager), x, target)
    train_step(plain, x, target)
    if early_stop:
        for p, q in zip(fused.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    else:
        assert_models_close(fused, eager, what="checkpointed")
        assert int(fused[0].bn.num_batches_tracked) == 2  # forward + recomputation
    for p, q in zip(fused.parameters(), plain.parameters()):  # recomputation: same gradients
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


# -- torch.func transforms, forward-mode AD, batched gradients --------------------------------
# The fused ops have no batching rules or forward derivatives: under a transform or a dual level
# every unit runs its eager composition (fusedres.fusability.eager_only_reason). Each model has
# run first, so that its plans exist (in eval the FusedResNet's whole-model plan).

def _has_run(model: nn.Module, x: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        for _ in range(2):
            model(x)
    return model


def _twins(backend: str, training: bool, resnet: bool):
    """(fused, eager twin, float64 oracle, x): small_net at [4, 3, 16, 16], or a resnet18 (5
    classes) at [2, 3, 32, 32], after two fused calls; the twins share its statistics."""
    if resnet:
        fused = fusedres.models.resnet18(num_classes=5, backend=backend)
        x = torch.randn(2, 3, 32, 32)
    else:
        fused, x = fused_eager_pair(backend)[0], torch.randn(4, 3, 16, 16)
    _has_run(fused.train(training), x)
    eager = fusedres.to_eager(copy.deepcopy(fused)).train(training)
    return fused, eager, reference.upcast(eager), x


def _functional_grads(model: nn.Module, x: torch.Tensor) -> dict:
    """torch.func.grad of a loss in the parameters through functional_call (MAML-style). The
    buffers are an argument of the transformed function: nn's BatchNorm may update them in
    place there, where it may not update a tensor the function captures."""
    target = torch.linspace(-1, 1, 5, dtype=x.dtype)

    def loss(params, buffers):
        return (torch.func.functional_call(model, {**params, **buffers}, (x,)) * target).sum()

    return torch.func.grad(loss)({k: v.detach() for k, v in model.named_parameters()},
                                 dict(model.named_buffers()))


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_func_grad_matches_eager(backend, training):
    """torch.func.grad through functional_call gives eager's parameter gradients and, in
    training, its running statistics (before: the C++ autograd Functions refused functorch)."""
    fused, eager, oracle, x = _twins(backend, training, resnet=False)
    grads = [_functional_grads(m, xx) for m, xx in ((fused, x), (eager, x), (oracle, x.double()))]
    for name in grads[2]:
        assert_oracle_close(grads[0][name], grads[1][name], grads[2][name], f"grad {name}")
    for (name, u), v, w in zip(fused.named_buffers(), eager.buffers(), oracle.buffers()):
        if u.is_floating_point():
            assert_oracle_close(u, v, w, name)
        else:
            assert torch.equal(u, v), name


def _dual_tangent(model: nn.Module, x: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    with torch.autograd.forward_ad.dual_level():
        out = model(torch.autograd.forward_ad.make_dual(x, tangent))
        return torch.autograd.forward_ad.unpack_dual(out).tangent


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("resnet", [False, True], ids=["small_net", "resnet18"])
def test_forward_mode_ad_matches_eager(backend, training, resnet):
    """Jacobian-vector products (forward_ad dual tensors; torch.func.jvp in eval, which eager's
    BatchNorm refuses in training) match eager's (before: torch.func.jvp's tangent came back
    all zeros in eval, silently; the dual tensors raised)."""
    fused, eager, oracle, x = _twins(backend, training, resnet)
    tangent = torch.randn_like(x)
    with torch.no_grad():
        expected = _dual_tangent(oracle, x.double(), tangent.double())
        assert_oracle_close(_dual_tangent(fused, x, tangent), _dual_tangent(eager, x, tangent),
                            expected, "forward_ad tangent")
        if not training:
            jvps = [torch.func.jvp(m, (xx,), (t,))[1] for m, xx, t in
                    ((fused, x, tangent), (eager, x, tangent),
                     (oracle, x.double(), tangent.double()))]
            assert_oracle_close(*jvps, "torch.func.jvp tangent")


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("resnet", [False, True], ids=["small_net", "resnet18"])
def test_vmap_eval_matches_eager(backend, resnet):
    """torch.func.vmap over a stack of batches in eval gives eager's outputs (before: the
    FusedResNet's channels_last conversion failed under vmap)."""
    fused, eager, oracle, x = _twins(backend, False, resnet)
    xs = torch.stack([x, -x, 2 * x])
    with torch.no_grad():
        outs = [torch.func.vmap(m)(xx)
                for m, xx in ((fused, xs), (eager, xs), (oracle, xs.double()))]
    assert_oracle_close(*outs, "vmap output")


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_batched_gradients_in_training(backend):
    """torch.autograd.grad(..., is_grads_batched=True), which jacobian(vectorize=True) runs:
    the backward of the fused units and blocks under batched gradients gives eager's (before:
    no batching rule for fusedres::block_backward)."""
    fused, eager, oracle, x = _twins(backend, True, resnet=False)
    vs = torch.randn(3, 4, 5)
    grads = []
    for model, xx, v in ((fused, x, vs), (eager, x, vs), (oracle, x.double(), vs.double())):
        xx = xx.clone().requires_grad_()
        inputs = [xx, *model.parameters()]
        grads.append(torch.autograd.grad(model(xx), inputs, v, is_grads_batched=True))
    names = ["x"] + [name for name, _ in fused.named_parameters()]
    for name, g_f, g_e, g_o in zip(names, *grads):
        assert_oracle_close(g_f, g_e, g_o, f"batched grad {name}")


# -- torch.fx symbolic tracing ---------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace_matches_eager(backend, training):
    """torch.fx.symbolic_trace (FX quantization and fusion passes, torchvision's feature
    extraction) records the eager composition's module calls (before: TypeError, "input must
    be a torch.Tensor, got Proxy")."""
    fused, eager, oracle, x = _twins(backend, training, resnet=True)
    traced = torch.fx.symbolic_trace(fused)
    with torch.no_grad():
        assert_oracle_close(traced(x), eager(x), oracle(x.double()), "traced output")


# -- TorchScript ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("mode", ["eval_no_grad", "eval", "train"])
def test_jit_trace_records_the_eager_composition(backend, mode, tmp_path):
    """torch.jit.trace (and the TorchScript-based ONNX export, which traces with it) records the
    eager composition: aten ops only, so the saved module loads and runs without fusedres, on
    any device; its outputs (and in training its running statistics) are eager's. Before: in
    eval without gradients the trace failed ("unsupported input list type: Scalar?", oneDNN's
    fused convolution), elsewhere it recorded fusedres's own ops."""
    training = mode == "train"
    fused, eager, oracle, x = _twins(backend, training, resnet=True)
    grad = torch.no_grad() if mode == "eval_no_grad" else torch.enable_grad()
    with grad:
        # check_trace (the default) runs the model again: in training that would move the
        # running statistics a second time.
        traced = torch.jit.trace(fused, x, check_trace=not training)
        if training:  # the trace ran one training forward: the twins run theirs
            eager(x)
            oracle(x.double())
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert all(kind.startswith(("aten::", "prim::")) for kind in kinds), sorted(kinds)
    assert "aten::batch_norm" in kinds or "aten::_batch_norm_impl_index" in kinds, sorted(kinds)
    path = tmp_path / "traced.pt"
    torch.jit.save(traced, str(path))
    loaded = torch.jit.load(str(path))
    with grad:
        outs = [m(xx) for m, xx in ((loaded, x), (eager, x), (oracle, x.double()))]
    assert_oracle_close(*outs, "traced output")
    if training:
        for (name, u), v, w in zip(loaded.named_buffers(), eager.buffers(), oracle.buffers()):
            if u.is_floating_point():
                assert_oracle_close(u, v, w, f"traced {name}")


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_jit_script_is_refused_with_the_remedy(backend):
    """torch.jit.script cannot compile the fused modules' forward (Python the TorchScript
    compiler does not take): it fails with an error that names the remedy, which works, and
    leaves the model as it was. Before: "Can't redefine method: forward on class ..."."""
    fused, eager, oracle, x = _twins(backend, False, resnet=True)
    types_before = [type(m) for m in fused.modules()]
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script\(fusedres\.to_eager\("):
        torch.jit.script(fused)
    assert [type(m) for m in fused.modules()] == types_before
    wrapped = nn.Sequential(fused.layer1[0])  # a fused block inside a module of the user's
    with pytest.raises(RuntimeError, match="FusedBasicBlock"):
        torch.jit.script(wrapped)
    assert type(wrapped[0]) is type(fused.layer1[0])
    scripted = torch.jit.script(fusedres.to_eager(copy.deepcopy(fused)))
    with torch.no_grad():
        assert_oracle_close(scripted(x), eager(x), oracle(x.double()), "scripted eager twin")
    head = fusedres.convert(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4),
                                          nn.ReLU()), backend=backend, sequentials=True)
    with pytest.raises(RuntimeError, match="FusedSequential"):  # a fused container, no block
        torch.jit.script(head)


def test_torchvision_feature_extractor_matches_eager():
    """torchvision's create_feature_extractor, as detection and segmentation code builds
    backbones, on a fused resnet18 in eval."""
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    fused, eager, oracle, x = _twins("cpu", False, resnet=True)
    nodes = {"layer2": "c3", "layer4": "c5"}
    outs = [feature_extraction.create_feature_extractor(m, return_nodes=nodes)(xx)
            for m, xx in ((fused, x), (eager, x), (oracle, x.double()))]
    for name in nodes.values():
        assert_oracle_close(outs[0][name], outs[1][name], outs[2][name], name)


# -- checkpoints and determinism -------------------------------------------------------------

def test_state_dict_round_trip(tmp_path):
    """A trained fused resnet18's file loads into the eager model and back: same eval logits."""
    fused = fusedres.models.resnet18(num_classes=10, backend="torch_ops")
    train_step(fused, torch.randn(4, 3, 32, 32), torch.randn(4, 10))
    path = tmp_path / "fused.pth"
    torch.save(fused.state_dict(), path)
    eager = reference.ResNet(reference.BasicBlock, [2, 2, 2, 2], num_classes=10)
    eager.load_state_dict(torch.load(path, weights_only=True))
    again = fusedres.models.resnet18(num_classes=10, weights=str(path), backend="torch_ops")
    x = torch.randn(2, 3, 32, 32)
    for m in (fused, eager, again):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(fused(x), again(x))


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_deterministic_training_is_bitwise_reproducible(backend):
    """With torch.use_deterministic_algorithms(True), two identical short fused training runs
    end with bitwise identical parameters and buffers."""
    pytest.importorskip("sklearn", reason="uses the digits data set (pip install scikit-learn)")
    from fusedres.finetune import FinetuneConfig, finetune

    cfg = dict(epochs=1, stop_after=4, image_size=16, batch_size=32, backend=backend,
               deterministic=True, progress=False, verbose=False)
    a = finetune(FinetuneConfig(**cfg))
    b = finetune(FinetuneConfig(**cfg))
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    assert a.losses == b.losses
    for (k, u), v in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(u, v), k
