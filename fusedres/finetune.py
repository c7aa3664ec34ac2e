"""Fine-tune a fused ResNet on a small image classification task; ``python -m fusedres.finetune``.

The workflow: build a fused ResNet (``--arch``), load a torchvision-format checkpoint from a
local file (``--weights``), replace the classifier for the task's K classes, and train

- ``--mode head``: only the new classifier (the backbone is frozen and kept in eval mode, so its
  BatchNorm statistics do not move and its units run the folded eval path);
- ``--mode full``: everything, BatchNorm in training mode (batch statistics);
- ``--mode frozen-bn``: everything, but every BatchNorm in eval mode (running statistics fixed,
  gamma/beta still trained): the usual choice for small batches. Every unit still runs fused:
  the frozen statistics fold into a per-channel scale and shift, and the backward gives the
  input, conv weight, gamma and beta their gradients,

with SGD (momentum, Nesterov) or AdamW, a linear warmup then cosine decay per step, optional
autocast (``--amp bf16|fp16``; fp16 uses a GradScaler), validation accuracy after every epoch,
and checkpoints that resume exactly (``--save``, ``--resume``).

Exact resume: the data order and augmentation of an epoch come from a generator seeded by
(seed, epoch), so a run restarted at (epoch, step) sees the very batches the uninterrupted run
would have seen; the checkpoint holds the model, optimizer, scheduler and scaler state and every
RNG state. On CPU a resumed run ends with bitwise the same parameters.

Data: the default is scikit-learn's bundled handwritten digits (offline, 10 classes), resized to
``--image-size``; ``--data DIR`` takes an ImageFolder layout with ``DIR/train`` and ``DIR/val``.

Example::

    python -m fusedres.finetune --arch resnet18 --epochs 3 --image-size 32 --backend cpu
    python -m fusedres.finetune --weights resnet50.pth --arch resnet50 --data ./flowers \\
        --image-size 224 --mode frozen-bn --optimizer adamw --lr 1e-3 --amp bf16 --save ft.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
import time
import warnings
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fusedres
from fusedres import data as fr_data
from fusedres.models import resnet as resnet_models

__all__ = [
    "ARCHS", "MODES", "FinetuneConfig", "FinetuneResult", "WarmupCosine", "apply_train_mode",
    "build_model", "epoch_batches", "evaluate", "finetune", "main", "make_optimizer",
]

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
         "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
MODES = ("head", "full", "frozen-bn")
_AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Fields that decide the training trajectory: a resumed run must match the checkpoint's.
_TRAJECTORY_FIELDS = ("arch", "data", "image_size", "mode", "optimizer", "lr", "momentum",
                      "weight_decay", "epochs", "warmup_steps", "batch_size", "amp", "seed",
                      "label_smoothing", "hflip")


@dataclasses.dataclass
class FinetuneConfig:
    """Everything one fine-tuning run depends on (the CLI flags, one to one).

    Attributes:
        arch: a name from ARCHS.
        weights: a local torchvision-format checkpoint (its ``fc`` is dropped), or None.
        data: an ImageFolder root with ``train/`` and ``val/``, or None for sklearn's digits.
        image_size: images are S x S.
        mode: ``head``, ``full`` or ``frozen-bn`` (see the module docstring).
        optimizer: ``sgd`` (momentum, Nesterov) or ``adamw``.
        lr, momentum, weight_decay: optimizer settings; weight decay skips biases and BN params.
        epochs: passes over the training split; the cosine schedule spans all of them.
        warmup_steps: linear warmup from 0 to ``lr`` over this many steps.
        batch_size: training and validation batch size (the last partial training batch is
            dropped so BatchNorm never sees a batch of one).
        amp: ``none``, ``bf16`` or ``fp16`` autocast; fp16 adds a GradScaler.
        backend: the fused backend (None: the global choice, see fusedres.backend).
        eager: run the plain-PyTorch twin of the model (fusedres.to_eager), to compare.
        compile: wrap the model in torch.compile.
        channels_last: model and inputs in channels_last memory format.
        device: ``cpu``, ``cuda``, ... (None: cuda when available).
        seed: seeds the head initialisation, data order and augmentation.
        label_smoothing: of the cross-entropy loss.
        hflip: random horizontal flips of training images (off for digits).
        save: checkpoint path written after every epoch (and every ``save_every`` steps).
        save_every: also checkpoint every this many steps (0: epochs only).
        resume: a checkpoint to continue from.
        stop_after: stop after this many optimizer steps in total (an interruption: the
            schedule still spans ``epochs``); None runs to the end.
        deterministic: torch.use_deterministic_algorithms(True) during the run.
        num_workers: DataLoader workers for ImageFolder data.
        progress: show a progress bar (tqdm when installed).
        verbose: print a line per epoch.
    """

    arch: str = "resnet18"
    weights: Optional[str] = None
    data: Optional[str] = None
    image_size: int = 32
    mode: str = "full"
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 3
    warmup_steps: int = 20
    batch_size: int = 32
    amp: str = "none"
    backend: Optional[str] = None
    eager: bool = False
    compile: bool = False
    channels_last: bool = False
    device: Optional[str] = None
    seed: int = 0
    label_smoothing: float = 0.0
    hflip: bool = False
    save: Optional[str] = None
    save_every: int = 0
    resume: Optional[str] = None
    stop_after: Optional[int] = None
    deterministic: bool = False
    num_workers: int = 0
    progress: bool = True
    verbose: bool = True


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: the trained model (not the torch.compile wrapper).
        losses: the training loss of every optimizer step so far (a resumed run includes the
            steps before the checkpoint).
        history: one dict per finished epoch: epoch, train_loss, val_loss, val_acc, lr, seconds.
        val_acc: the last validation accuracy in [0, 1] (None if no epoch finished).
        steps: optimizer steps taken in total.
    """

    model: nn.Module
    losses: list
    history: list
    val_acc: Optional[float]
    steps: int


class WarmupCosine:
    """Learning-rate factor: linear warmup over ``warmup`` steps, then cosine decay to 0.

    A callable object rather than a lambda, so LambdaLR's state_dict stores it.
    """

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _step_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler,
                   scaler: torch.amp.GradScaler) -> None:
    """Advances the per-step schedule by one step, whether or not the optimizer stepped.

    The GradScaler skips ``optimizer.step()`` on a step whose fp16 gradients overflowed (the
    first steps, while it finds its scale). The schedule counts steps taken, skipped or not, so
    the learning rate of step k is the schedule's k-th value either way and a resumed run stays
    exact. PyTorch's scheduler checks, on its first step only, that the optimizer stepped before
    it and warns otherwise; with a skipped first step that warning is about a call order this
    loop does not have, so it is silenced there, and only there: ``catch_warnings`` resets the
    interpreter's record of warnings already shown, which around every step would repeat them.
    """
    if scheduler.last_epoch > 0 or not scaler.is_enabled():
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning,
                                message=r"Detected call of `lr_scheduler\.step\(\)` before "
                                        r"`optimizer\.step\(\)`")
        scheduler.step()


def build_model(arch: str, num_classes: int, weights: Optional[str] = None,
                backend: Optional[str] = None, eager: bool = False) -> nn.Module:
    """A fused ResNet with a fresh ``num_classes`` head, backbone from a torchvision checkpoint.

    Args:
        arch: a name from ARCHS.
        num_classes: K, the outputs of the new classifier.
        weights: path to a local torchvision-format checkpoint (any classifier size: ``fc.*`` is
            dropped and the new head keeps its fresh initialisation), or None for random init.
        backend: the fused backend name (None: the global choice).
        eager: return the plain-PyTorch twin (fusedres.to_eager) instead.

    Returns:
        The model: [N, 3, H, W] -> [N, num_classes].
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    model = getattr(resnet_models, arch)(num_classes=num_classes, backend=backend)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise RuntimeError(f"{weights} does not fit {arch}: missing keys {missing[:5]}, "
                               f"unexpected keys {unexpected[:5]}")
    return fusedres.to_eager(model) if eager else model


def _set_trainable(model: nn.Module, mode: str) -> None:
    """requires_grad per mode: the head only, or every parameter."""
    for name, p in model.named_parameters():
        p.requires_grad_(mode != "head" or name.startswith("fc."))


def apply_train_mode(model: nn.Module, mode: str) -> None:
    """``model.train()`` adjusted to the fine-tuning mode.

    ``head``: the backbone stays in eval mode (frozen features, running statistics untouched);
    ``frozen-bn``: every BatchNorm in eval mode (it normalises with running statistics and does
    not update them, while its weight and bias still get gradients); ``full``: plain train().
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model.train()
    if mode == "head":
        model.eval()
        model.fc.train()
    elif mode == "frozen-bn":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW over the trainable parameters.

    Weight decay applies to conv and linear weights only: decaying BN's gamma/beta and biases
    pulls them towards 0 for no regularisation benefit.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The training batches of one epoch and its flip decisions, a pure function of its args.

    Returns:
        (batches, flips): index tensors [batch_size] (a partial last batch is dropped), and a
        bool tensor [num_samples] (flip the i-th sample of the permutation), drawn from a
        generator seeded by (seed, epoch).
    """
    if num_samples < batch_size:
        raise ValueError(f"the training split has {num_samples} samples, fewer than one batch "
                         f"of {batch_size}")
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    flips = torch.rand(num_samples, generator=g) < 0.5
    n_full = num_samples // batch_size * batch_size
    return list(perm[:n_full].split(batch_size)), flips


def _iterate(dataset: Dataset, batches: Sequence[torch.Tensor], num_workers: int
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (images [B, 3, S, S], labels [B]) for the given index batches."""
    if isinstance(dataset, TensorDataset):
        # In-memory data: one gather per batch instead of per-sample fetch and collate.
        xs, ys = dataset.tensors
        for idx in batches:
            yield xs[idx], ys[idx]
        return
    loader = DataLoader(dataset, batch_sampler=[b.tolist() for b in batches],
                        num_workers=num_workers)
    yield from loader


class _Progress:
    """tqdm when installed, else a bar printed to stderr at every 10 %."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool) -> None:
        self.bar = None
        self.total, self.n, self.desc, self.enabled = total, initial, desc, enabled
        self._printed = -1
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, **stats) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(stats, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            tenth = 10 * self.n // max(1, self.total)
            if tenth != self._printed:
                self._printed = tenth
                bar = "#" * tenth + "." * (10 - tenth)
                info = " ".join(f"{k}={v}" for k, v in stats.items())
                print(f"{self.desc} [{bar}] {self.n}/{self.total} {info}", file=sys.stderr,
                      flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
             num_workers: int = 0) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` (switched to eval mode) on ``dataset``.

    Returns:
        (accuracy in [0, 1], mean loss).
    """
    model.eval()
    n = len(dataset)
    batches = list(torch.arange(n).split(batch_size))
    correct, loss_sum = 0, 0.0
    for x, y in _iterate(dataset, batches, num_workers):
        x, y = _to_device(x, y, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return correct / n, loss_sum / n


def _to_device(x, y, device, channels_last):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])


def _save(path: str, payload: dict) -> None:
    # Write then rename, so an interruption mid-write never leaves a truncated checkpoint.
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _datasets(cfg: FinetuneConfig):
    if cfg.data is None:
        return fr_data.digits_datasets(cfg.image_size)
    return fr_data.image_folder_datasets(cfg.data, cfg.image_size)


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Runs (or resumes) one fine-tuning run described by ``cfg``.

    Args:
        cfg: the run's settings; with ``cfg.resume`` the trajectory fields must equal the
            checkpoint's (a ValueError names the ones that differ).

    Returns:
        A FinetuneResult with the trained model, per-step losses and per-epoch history.
    """
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.amp not in _AMP_DTYPES:
        raise ValueError(f"amp must be one of {tuple(_AMP_DTYPES)}, got {cfg.amp!r}")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp_dtype = _AMP_DTYPES[cfg.amp]
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        return _run(cfg, device, amp_dtype)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _run(cfg: FinetuneConfig, device: torch.device, amp_dtype) -> FinetuneResult:
    ckpt = None
    if cfg.resume is not None:
        ckpt = torch.load(cfg.resume, map_location="cpu", weights_only=False)
        differ = [f for f in _TRAJECTORY_FIELDS if ckpt["config"].get(f) != getattr(cfg, f)]
        if differ:
            raise ValueError(f"cannot resume {cfg.resume}: these settings differ from the "
                             f"checkpoint's: " + ", ".join(
                                 f"{f}={getattr(cfg, f)!r} (checkpoint {ckpt['config'][f]!r})"
                                 for f in differ))

    torch.manual_seed(cfg.seed)
    train_ds, val_ds, classes = _datasets(cfg)
    model = build_model(cfg.arch, len(classes), None if ckpt else cfg.weights, cfg.backend,
                        cfg.eager)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    _set_trainable(model, cfg.mode)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    steps_per_epoch = len(train_ds) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(cfg.warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    losses, history = [], []
    epoch, step_in_epoch, global_step = 0, 0, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        epoch, step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        global_step, losses, history = ckpt["global_step"], ckpt["losses"], ckpt["history"]
        _set_rng_state(ckpt["rng"])
    run_model = torch.compile(model) if cfg.compile else model

    def checkpoint(next_epoch: int, next_step: int) -> None:
        if cfg.save is None:
            return
        _save(cfg.save, {
            "config": dataclasses.asdict(cfg), "classes": classes, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": next_epoch, "step_in_epoch": next_step,
            "global_step": global_step, "losses": losses, "history": history,
            "rng": _rng_state()})

    val_acc = history[-1]["val_acc"] if history else None
    while epoch < cfg.epochs:
        if cfg.stop_after is not None and global_step >= cfg.stop_after:
            break
        batches, flips = epoch_batches(len(train_ds), cfg.batch_size, cfg.seed, epoch)
        apply_train_mode(model, cfg.mode)
        bar = _Progress(steps_per_epoch, step_in_epoch, f"epoch {epoch + 1}/{cfg.epochs}",
                        cfg.progress)
        t0 = time.perf_counter()
        for x, y in _iterate(train_ds, batches[step_in_epoch:], cfg.num_workers):
            if cfg.hflip:
                start = step_in_epoch * cfg.batch_size
                f = flips[start:start + x.shape[0]].view(-1, 1, 1, 1)
                x = torch.where(f, x.flip(-1), x)
            x, y = _to_device(x, y, device, cfg.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                logits = run_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            _step_schedule(scheduler, scaler)
            step_in_epoch += 1
            global_step += 1
            losses.append(loss.item())
            bar.update(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if cfg.save_every and global_step % cfg.save_every == 0:
                checkpoint(epoch, step_in_epoch)
            if cfg.stop_after is not None and global_step >= cfg.stop_after:
                break
        bar.close()
        if step_in_epoch < steps_per_epoch:
            checkpoint(epoch, step_in_epoch)
            break
        val_acc, val_loss = evaluate(run_model, val_ds, cfg.batch_size, device, amp_dtype,
                                     cfg.channels_last, cfg.num_workers)
        # From the full loss list, so an epoch resumed part-way reports the same mean.
        epoch_losses = losses[global_step - steps_per_epoch:global_step]
        history.append({"epoch": epoch + 1, "train_loss": sum(epoch_losses) / len(epoch_losses),
                        "val_loss": val_loss, "val_acc": val_acc,
                        "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0})
        if cfg.verbose:
            h = history[-1]
            print(f"epoch {h['epoch']}/{cfg.epochs}: train_loss {h['train_loss']:.4f} "
                  f"val_loss {val_loss:.4f} val_acc {100 * val_acc:.2f}% ({h['seconds']:.1f}s)",
                  flush=True)
        epoch, step_in_epoch = epoch + 1, 0
        checkpoint(epoch, 0)
    apply_train_mode(model, cfg.mode)
    return FinetuneResult(model=model, losses=losses, history=history, val_acc=val_acc,
                          steps=global_step)


def _parser() -> argparse.ArgumentParser:
    d = FinetuneConfig()
    p = argparse.ArgumentParser(
        prog="python -m fusedres.finetune",
        description="Fine-tune a fused ResNet (default data: scikit-learn's digits, offline).")
    p.add_argument("--arch", default=d.arch, choices=ARCHS)
    p.add_argument("--weights", help="local torchvision-format checkpoint (its fc is replaced)")
    p.add_argument("--data", help="ImageFolder root with train/ and val/ (default: sklearn digits)")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--mode", default=d.mode, choices=MODES,
                   help="head: classifier only; full: everything; frozen-bn: everything with "
                        "BatchNorm in eval mode (affine params still trained)")
    p.add_argument("--optimizer", default=d.optimizer, choices=("sgd", "adamw"))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--amp", default=d.amp, choices=tuple(_AMP_DTYPES))
    p.add_argument("--backend", choices=fusedres.BACKEND_NAMES + ("auto",),
                   help="fused backend (default: FUSEDRES_BACKEND or auto)")
    p.add_argument("--eager", action="store_true",
                   help="train the plain-PyTorch twin of the model instead, to compare")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--hflip", action="store_true", help="random horizontal flips in training")
    p.add_argument("--save", help="checkpoint path, written after every epoch")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--resume", help="checkpoint to resume from (exactly)")
    p.add_argument("--stop-after", type=int, help="stop after N steps in total (schedule unchanged)")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: parses ``argv``, runs :func:`finetune`, prints the final accuracy."""
    args = _parser().parse_args(argv)
    cfg = FinetuneConfig(**vars(args))
    t0 = time.perf_counter()
    result = finetune(cfg)
    acc = "n/a" if result.val_acc is None else f"{100 * result.val_acc:.2f}%"
    path = "eager" if cfg.eager else f"fused, backend {fusedres.current_backend_name(cfg.backend)}"
    print(f"done: {cfg.arch} ({path}), {result.steps} steps, val_acc {acc}, "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
