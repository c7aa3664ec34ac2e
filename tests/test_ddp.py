"""DistributedDataParallel over fused models: two gloo processes on the CPU.

Without SyncBatchNorm every rank normalises with the statistics of its own slice of the batch,
so the oracle is not one process on the combined batch (whose BN statistics would span both
halves) but two replicas in one process, one per half batch, whose gradients are averaged, which
is exactly what DDP computes. Rank 0's parameters and buffers must match replica 0's. With frozen
BN statistics (fine-tuning's ``frozen-bn`` mode) every sample's loss is independent of the rest
of the batch, and a fused ResNet-18 under DDP must end where one process on the combined batch
ends.

SyncBatchNorm: ``nn.SyncBatchNorm.convert_sync_batchnorm`` on a fused model replaces its
BatchNorm2d modules, so every fused unit falls back to the eager composition (``unfusable_reason`` in
fusedres.fusability) and SyncBatchNorm itself does the synchronisation. PyTorch only synchronises
CUDA/XPU/HPU tensors: on CPU tensors it raises, so here the CPU tests check the fallback in one
process and that the two-process CPU run fails loudly, and a CUDA test (two GPUs) compares the
synchronised statistics with one process on the combined batch.
"""

import faulthandler
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fusedres
from fusedres import FusedBasicBlock, FusedConvBNReLU, reference

from conftest import CPU_FUSED_BACKENDS

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD, HALF, STEPS = 2, 4, 3


def _net(backend: str) -> nn.Sequential:
    """[N, 3, 16, 16] -> [N, 5]: stem unit, BasicBlock with downsample, head."""
    torch.manual_seed(0)
    return nn.Sequential(
        FusedConvBNReLU(3, 8, 3, stride=2, backend=backend),
        FusedBasicBlock(8, 16, stride=2, backend=backend,
                        downsample=nn.Sequential(reference.conv1x1(8, 16, 2), nn.BatchNorm2d(16))),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def _resnet18_frozen_bn(backend: str) -> nn.Module:
    """[N, 3, 32, 32] -> [N, 5] fused ResNet-18 with non-trivial, frozen BN statistics, in float64.

    float64 because the comparison spans three SGD steps of a whole network: in float32 one
    pre-activation within rounding of 0 flips its ReLU mask in one run and not in the other
    (fused and eager round differently), which moves a whole block's input gradient and, after
    two steps, every weight upstream by far more than the tolerance (docs/design.md section 6).
    """
    torch.manual_seed(0)
    net = fusedres.models.resnet18(num_classes=5, backend=backend).double()
    with torch.no_grad():
        net(torch.randn(16, 3, 32, 32, dtype=torch.float64) * 1.5 + 0.3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return net


def _build(model: str, backend: str) -> nn.Module:
    return _resnet18_frozen_bn(backend) if model == "resnet18-frozen-bn" else _net(backend)


def _batches(size: int = 16):
    """STEPS global batches: (x [2*HALF, 3, size, size], labels [2*HALF])."""
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(WORLD * HALF, 3, size, size, generator=g),
             torch.randint(0, 5, (WORLD * HALF,), generator=g)) for _ in range(STEPS)]


def _worker(rank, init_file, backend, out_path, sync_bn, device, model_name):
    faulthandler.enable(all_threads=True)  # a crash in a rank prints where it happened
    dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method=f"file://{init_file}",
                            rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        dev = torch.device(device if device == "cpu" else f"cuda:{rank}")
        net = _build(model_name, backend)
        if sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net.to(dev)
        model = DDP(net, device_ids=None if dev.type == "cpu" else [rank])
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for x, y in _batches(_image_size(model_name)):
            sl = slice(rank * HALF, (rank + 1) * HALF)
            dtype = next(net.parameters()).dtype
            loss = F.cross_entropy(model(x[sl].to(dev, dtype)), y[sl].to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if rank == 0:
            torch.save({k: v.cpu() for k, v in net.state_dict().items()}, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A rank that got here has done its part; leave without interpreter finalization. There,
    # gloo's worker threads can still hold work objects with tensors, and destroying them then
    # aborts the process ("terminate called without an active exception", SIGABRT), which
    # failed CI runs now and then even with the barrier above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _image_size(model_name: str) -> int:
    return 32 if model_name == "resnet18-frozen-bn" else 16


def _run_ddp(tmp_path, backend, sync_bn=False, device="cpu", model_name="small"):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(str(tmp_path / "pg"), backend, str(out), sync_bn, device, model_name),
             nprocs=WORLD, join=True)
    return torch.load(out, weights_only=True)


def _per_rank_oracle(backend):
    """Two replicas, one per half batch, gradients averaged: DDP without SyncBN, in one process."""
    replicas = [_net(backend) for _ in range(WORLD)]
    opts = [torch.optim.SGD(r.parameters(), lr=0.1, momentum=0.9) for r in replicas]
    for x, y in _batches():
        for rank, r in enumerate(replicas):
            sl = slice(rank * HALF, (rank + 1) * HALF)
            r.zero_grad()
            F.cross_entropy(r(x[sl]), y[sl]).backward()
        for params in zip(*(r.parameters() for r in replicas)):
            mean = sum(p.grad for p in params) / WORLD
            for p in params:
                p.grad = mean.clone()
        for o in opts:
            o.step()
    return replicas[0].state_dict()


def _train_combined(model_name: str, backend: str) -> nn.Module:
    """One process, STEPS SGD steps on the combined batches."""
    net = _build(model_name, backend)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for x, y in _batches(_image_size(model_name)):
        opt.zero_grad()
        F.cross_entropy(net(x.to(next(net.parameters()).dtype)), y).backward()
        opt.step()
    return net


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_ddp_matches_per_rank_oracle(tmp_path, backend):
    ddp_state = _run_ddp(tmp_path, backend)
    oracle = _per_rank_oracle("eager")
    for k, v in oracle.items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # The oracle is not trivially satisfied: one process on the combined batch differs.
    combined = _train_combined("small", "eager")
    assert not torch.allclose(combined.state_dict()["1.bn1.running_var"],
                              ddp_state["1.bn1.running_var"], rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_ddp_frozen_bn_resnet18_matches_combined_batch(tmp_path, backend):
    """Frozen BN statistics: two ranks of 4 images end where one eager process on the 8 ends."""
    ddp_state = _run_ddp(tmp_path, backend, model_name="resnet18-frozen-bn")
    combined = _train_combined("resnet18-frozen-bn", "eager").state_dict()
    start = _resnet18_frozen_bn("eager").state_dict()
    assert not torch.allclose(combined["conv1.weight"], start["conv1.weight"])
    for k, v in combined.items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_sync_batchnorm_falls_back_to_eager_composition(backend):
    """One process (no process group): a SyncBatchNorm-converted fused model computes exactly
    what the converted eager model does, outputs, gradients and running statistics."""
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(_net(backend))
    eager = nn.SyncBatchNorm.convert_sync_batchnorm(fusedres.to_eager(_net(backend)))
    assert isinstance(fused[0].bn, nn.SyncBatchNorm)
    x, y = _batches()[0]
    for m in (fused, eager):
        F.cross_entropy(m(x), y).backward()
    for (k, u), v in zip(fused.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(u, v), k
    for p, q in zip(fused.parameters(), eager.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_sync_batchnorm_on_cpu_raises_pytorch_error(tmp_path):
    """Two gloo processes with SyncBatchNorm on CPU tensors: PyTorch refuses (it synchronises
    only accelerator tensors), and the fused model surfaces that error rather than training
    silently unsynchronised."""
    # The wording differs between torch versions (DDP's check, or SyncBatchNorm's own).
    with pytest.raises(Exception, match="SyncBatchNorm (layers only work with GPU modules|"
                                        "expected input tensor to be on GPU)"):
        _run_ddp(tmp_path, "torch_ops", sync_bn=True)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_sync_batchnorm_matches_combined_batch_cuda(tmp_path):
    """SyncBatchNorm across 2 GPUs equals one process on the combined batch."""
    ddp_state = _run_ddp(tmp_path, "auto", sync_bn=True, device="cuda")
    combined = _train_combined("small", "eager")
    for k, v in combined.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-4, atol=1e-5, msg=k)
