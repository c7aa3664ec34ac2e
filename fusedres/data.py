"""Small image-classification datasets for fine-tuning, with no torchvision dependency.

Two sources, both returning ``(image [3, S, S] float32, label int)`` samples:

- :func:`digits_datasets`: scikit-learn's bundled handwritten digits (1797 8x8 grey images,
  10 classes; shipped inside the scikit-learn package, so it works offline), upsampled to
  ``S x S`` and repeated over 3 channels, with a fixed stratified train/val split.
- :class:`ImageFolder`: torchvision's directory layout ``root/<class>/<image>``, decoded with
  PIL, resized (shorter side) and centre-cropped to ``S x S``.

Shuffling and augmentation are not done here: the training loop draws them from generators
seeded by (seed, epoch), which is what makes an interrupted run resume bit for bit
(see :mod:`fusedres.finetune`).
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFolder", "digits_datasets", "image_folder_datasets"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def digits_datasets(image_size: int = 32, val_fraction: float = 0.2
                    ) -> tuple[TensorDataset, TensorDataset, list[str]]:
    """scikit-learn's handwritten digits as a 3-channel image classification task.

    The split is stratified with a fixed seed, so every run (and every machine) sees the same
    train and validation images. Pixels are scaled to [0, 1], upsampled bilinearly, then
    standardised with the training split's mean and standard deviation.

    Args:
        image_size: S, the side of the returned images (8 keeps the original resolution).
        val_fraction: the share of each class held out for validation.

    Returns:
        (train, val, classes): TensorDatasets of (images [n, 3, S, S] float32, labels [n] int64)
        (about 1437 / 360 samples), and the class names ``["0", ..., "9"]``.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("the default fine-tuning data set needs scikit-learn "
                          "(pip install scikit-learn), or pass an ImageFolder directory") from exc
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [n,1,8,8]
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(range(len(labels)), test_size=val_fraction,
                                          random_state=0, stratify=bunch.target)
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False)
    images = images.expand(-1, 3, -1, -1)
    train_x = images[train_idx]
    mean, std = train_x.mean(), train_x.std()
    images = ((images - mean) / std).contiguous()
    classes = [str(int(c)) for c in bunch.target_names]
    return (TensorDataset(images[train_idx].clone(), labels[train_idx]),
            TensorDataset(images[val_idx].clone(), labels[val_idx]), classes)


class ImageFolder(Dataset):
    """torchvision's ``ImageFolder`` layout read with PIL: ``root/<class_name>/<file>``.

    Classes are the sorted sub-directory names; files with an image extension are the samples.

    Args:
        root: the directory.
        image_size: S; each image is resized so its shorter side is S, then centre-cropped.
        mean, std: per-channel normalisation after scaling pixels to [0, 1].
        transform: optional callable applied to the normalised [3, S, S] tensor.

    Shapes: ``dataset[i]`` -> (image [3, S, S] float32, label int).
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageFolder: {self.root!r} is not a directory")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"ImageFolder: no class sub-directories in {self.root!r}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for c in self.classes:
            for dirpath, _, files in sorted(os.walk(os.path.join(self.root, c))):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), self.class_to_idx[c]))
        if not self.samples:
            raise FileNotFoundError(f"ImageFolder: no images ({', '.join(IMG_EXTENSIONS)}) "
                                    f"under {self.root!r}")
        self.targets = [t for _, t in self.samples]
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> torch.Tensor:
        """Decodes, resizes and centre-crops one image: -> [3, S, S] float32 in [0, 1]."""
        from PIL import Image

        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            s = self.image_size / min(w, h)
            img = img.resize((max(self.image_size, round(w * s)), max(self.image_size, round(h * s))),
                             Image.BILINEAR)
            w, h = img.size
            left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
            img = img.crop((left, top, left + self.image_size, top + self.image_size))
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255.0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        x = (self.load(path) - self.mean) / self.std
        if self.transform is not None:
            x = self.transform(x)
        return x, target


def image_folder_datasets(root: str | os.PathLike, image_size: int = 224
                          ) -> tuple[ImageFolder, ImageFolder, list[str]]:
    """``root/train`` and ``root/val`` (ImageNet's layout) as ImageFolder datasets.

    Returns:
        (train, val, classes); both splits must have the same class directories.
    """
    train = ImageFolder(os.path.join(root, "train"), image_size)
    val = ImageFolder(os.path.join(root, "val"), image_size)
    if train.classes != val.classes:
        raise ValueError(f"{root}: train/ and val/ have different class directories "
                         f"({len(train.classes)} vs {len(val.classes)})")
    return train, val, train.classes
