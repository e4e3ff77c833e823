"""Data loading: ImageFolder/ImageNet with the DeiT recipe, repeated augmentation, and the embedded digits set.

The DeiT recipe (docs/method.md §4.5): RandomResizedCrop (bicubic), flip, RandAugment ``rand-m9-mstd0.5-inc1``, random
erasing 0.25, Mixup 0.8 / CutMix 1.0 with label smoothing 0.1, repeated augmentation x3. The transforms come from
``timm.data.create_transform`` and the mixing from ``timm.data.Mixup``; the samplers are ours.

The demo set is the UCI "Optical Recognition of Handwritten Digits" 8x8 data (CC BY 4.0, see
``spvit/assets/DIGITS_LICENSE.md``), shipped in the package as ``spvit/assets/digits.npz``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DIGITS_PATH = os.path.join(ASSETS, "digits.npz")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """Bad dataset input (missing folder, wrong layout); the CLI reports it and exits with code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Embedded digits set


class DigitsDataset(Dataset):
    """The embedded 8x8 handwritten digits, upsampled to ``size`` x ``size``, one channel, normalised.

    Three disjoint splits from a fixed permutation (seed 0) of the 1797 images: the last :attr:`n_test` (360) are
    the test set, the :attr:`n_val` (180) before them the validation set (every choice of a run: the best epoch),
    the other 1257 the training set. With ``augment`` the training images get a random shift of up to
    ``max_shift`` pixels (of the upsampled image).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: side of the upsampled image (bilinear).
        augment: random translation (training split only).
    Items: ``(image (1, size, size) float32, label int)``.
    """

    n_test = 360
    n_val = 180
    SPLITS = ("train", "val", "test")

    def __init__(self, split: str = "train", size: int = 16, augment: bool = False, max_shift: int = 2):
        if split not in self.SPLITS:
            raise DataError(f"digits split must be one of {self.SPLITS}, got {split!r}")
        if size < 1:
            raise DataError(f"digits image size must be >= 1, got {size}")
        with np.load(DIGITS_PATH) as z:
            images, labels = z["images"], z["labels"]
        idx = self.split_indices(len(labels))[split]
        x = torch.from_numpy(images[idx].astype(np.float32) / 16.0).unsqueeze(1)  # (n, 1, 8, 8) in [0, 1]
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        self.images = ((x - 0.3) / 0.4).contiguous()
        self.targets = torch.from_numpy(labels[idx].astype(np.int64))
        self.split = split
        self.augment = augment and split == "train"
        self.max_shift = max_shift
        self.num_classes = 10
        self.in_chans = 1

    @classmethod
    def split_indices(cls, n: int) -> dict:
        """Indices of the three disjoint splits (a fixed permutation, seed 0)."""
        perm = np.random.default_rng(0).permutation(n)
        n_trainval = n - cls.n_test
        return {"train": perm[:n_trainval - cls.n_val], "val": perm[n_trainval - cls.n_val:n_trainval],
                "test": perm[n_trainval:]}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.augment and self.max_shift > 0:
            # Random shift drawn from torch's global RNG (saved in checkpoints, so resume stays exact).
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
            bg = float(self.images.min())
            x = torch.roll(x, shifts=(dy, dx), dims=(1, 2)).clone()
            if dy > 0:
                x[:, :dy] = bg
            elif dy < 0:
                x[:, dy:] = bg
            if dx > 0:
                x[:, :, :dx] = bg
            elif dx < 0:
                x[:, :, dx:] = bg
        return x, int(self.targets[i])


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder


def check_imagefolder(root: str, headers: bool = True) -> None:
    """Raise :class:`DataError` unless ``root`` is a folder of class subfolders holding images. With ``headers``,
    the header of every image is read too (format, size, Pillow's decompression-bomb limit), so that a corrupt file
    is found before a run writes anything rather than mid-epoch."""
    if not os.path.isdir(root):
        raise DataError(f"dataset folder not found: {root}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise DataError(f"{root} has no class subfolders (expected {root}/<class>/<image>.jpg, ImageNet layout)")
    paths = []
    for c in classes:
        found = False
        for dirpath, _, files in os.walk(os.path.join(root, c)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    found = True
                    paths.append(os.path.join(dirpath, f))
                    if os.path.getsize(paths[-1]) == 0:
                        raise DataError(f"image {paths[-1]} is empty (0 bytes); remove or replace it")
        if not found:
            raise DataError(f"class folder {os.path.join(root, c)} holds no images ({', '.join(IMG_EXTENSIONS)})")
    if len(classes) < 2:
        raise DataError(f"{root} has one class folder ({classes[0]}); a classifier needs at least 2 classes")
    if headers:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:  # file reads: threads overlap the waits
            for _ in pool.map(check_image_header, paths, chunksize=256):
                pass


def _open_error(path: str, exc: BaseException) -> DataError:
    return DataError(f"cannot read image {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                     f"remove or replace it")


def check_image_header(path: str) -> None:
    """Raise :class:`DataError` naming ``path`` when Pillow cannot identify it or it exceeds the decompression-bomb
    limit (the pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            if w < 1 or h < 1:
                raise ValueError(f"size {w}x{h}")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _open_error(path, exc) from None


def load_image(path: str):
    """An RGB PIL image; an unreadable file is a :class:`DataError` naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _open_error(path, exc) from None


def split_dir(root: str, split: str) -> str:
    """The folder of one split of an ImageNet-layout dataset: ``root/train`` and ``root/val`` (``validation``)."""
    if not os.path.isdir(root):
        raise DataError(f"dataset folder not found: {root}")
    names = ("train",) if split == "train" else ("val", "validation", "test")
    for n in names:
        p = os.path.join(root, n)
        if os.path.isdir(p):
            return p
    raise DataError(f"{root} has no '{names[0]}' folder (expected ImageNet layout: {root}/train/<class>/*.jpg and "
                    f"{root}/val/<class>/*.jpg)")


@dataclass
class DataConfig:
    """The DeiT data recipe; defaults are the original values (docs/method.md §4.5)."""

    input_size: int = 224
    color_jitter: float = 0.4
    aa: Optional[str] = "rand-m9-mstd0.5-inc1"
    train_interpolation: str = "bicubic"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    crop_pct: float = 224 / 256
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    repeated_aug: bool = True
    num_workers: int = 8
    pin_mem: bool = True


def safe_posterize(img, bits_to_keep, **_):
    """Posterize that accepts every bit count RandAugment draws: 0 bits (keep no bit: a black image, what Pillow
    gave before it began to reject 0) to 8 (unchanged)."""
    from PIL import Image, ImageOps

    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)


def _augment_ops(t) -> Iterator:
    """Every timm ``AugmentOp`` inside a transform (Compose, RandAugment, AutoAugment policies, AugMix)."""
    if hasattr(t, "aug_fn") and hasattr(t, "level_fn"):
        yield t
        return
    for name in ("transforms", "ops", "policy"):
        sub = getattr(t, name, None)
        if isinstance(sub, (list, tuple)):
            for s in sub:
                yield from (_augment_ops(s) if not isinstance(s, (list, tuple)) else
                            (op for x in s for op in _augment_ops(x)))


def harden_augment(transform):
    """Replace the posterize op of timm's RandAugment / AutoAugment ops in ``transform`` (in place, this transform
    only) by :func:`safe_posterize`: the magnitude noise of ``rand-m9-mstd0.5`` draws 0 bits now and then, which
    newer Pillow releases reject with a ValueError."""
    for op in _augment_ops(transform):
        if str(getattr(op, "name", "")).startswith("Posterize"):
            op.aug_fn = safe_posterize
    return transform


REMODES = ("pixel", "rand", "const")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "hamming", "box", "random")


def check_data_config(cfg: DataConfig) -> None:
    """Raise :class:`DataError` for augmentation settings timm would fail on later (or mid-run)."""
    if cfg.remode not in REMODES:
        raise DataError(f"remode must be one of {', '.join(REMODES)}, got {cfg.remode!r}")
    if cfg.train_interpolation not in INTERPOLATIONS:
        raise DataError(f"train_interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                        f"got {cfg.train_interpolation!r}")
    if not isinstance(cfg.recount, int) or isinstance(cfg.recount, bool) or cfg.recount < 1:
        raise DataError(f"recount must be an integer >= 1, got {cfg.recount!r}")
    if cfg.aa not in (None, "", "none"):
        try:
            build_transform(True, DataConfig(**{**cfg.__dict__, "input_size": 8}))
        except Exception as exc:  # timm's parser raises AssertionError, KeyError, ValueError...
            detail = str(exc).splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            raise DataError(f"--aa {cfg.aa!r} is not a timm augmentation policy ({detail}); use e.g. "
                            f"'rand-m9-mstd0.5-inc1' (the default), 'augmix-m5-w3', 'original' or 'none'") from None


def build_transform(is_train: bool, cfg: DataConfig):
    """timm transforms of the DeiT recipe (train: RRC + flip + RandAugment + erasing; eval: resize + centre crop).
    The training transform's posterize op takes every bit count (:func:`harden_augment`)."""
    from timm.data import create_transform

    if is_train:
        return harden_augment(create_transform(
            input_size=cfg.input_size, is_training=True, color_jitter=cfg.color_jitter,
            auto_augment=cfg.aa if cfg.aa not in (None, "", "none") else None,
            interpolation=cfg.train_interpolation, re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount))
    return create_transform(input_size=cfg.input_size, is_training=False, interpolation="bicubic",
                            crop_pct=cfg.crop_pct)


def build_imagefolder(root: str, split: str, cfg: DataConfig):
    """torchvision ImageFolder over ``root/train`` or ``root/val`` with the DeiT transforms."""
    from torchvision.datasets import ImageFolder

    d = split_dir(root, split)
    check_imagefolder(d)
    ds = ImageFolder(d, transform=build_transform(split == "train", cfg), loader=load_image)
    ds.num_classes = len(ds.classes)
    return ds


def build_mixup(cfg: DataConfig, num_classes: int):
    """timm Mixup/CutMix with label smoothing folded into the targets, or None when both alphas are 0."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                 mode=cfg.mixup_mode, label_smoothing=cfg.smoothing, num_classes=num_classes)


# ----------------------------------------------------------------------------------------------------------------
# Samplers


class RepeatedAugSampler(Sampler):
    """Repeated augmentation (DeiT's RASampler, written anew): each index ``repeats`` times across the ranks.

    Per epoch: a permutation seeded by ``seed + epoch`` (same on every rank), each index repeated ``repeats`` times
    consecutively, padded to a multiple of the world size, rank ``r`` takes every ``world``-th entry from ``r``; the
    epoch is cut to ``floor(floor(|D| / 256) * 256 / world)`` samples per rank (``ceil(|D| / world)`` for sets
    smaller than 256), so one epoch still sees about |D| samples in total.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, repeats: int = 3,
                 seed: int = 0):
        self.n = len(dataset)
        self.world, self.rank, self.shuffle, self.repeats, self.seed = num_replicas, rank, shuffle, repeats, seed
        self.epoch = 0
        self.per_rank_total = int(math.ceil(self.n * repeats / num_replicas))
        if self.n >= 256:
            self.num_selected = int(math.floor(self.n // 256 * 256 / num_replicas))
        else:
            self.num_selected = int(math.ceil(self.n / num_replicas))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g)
        else:
            idx = torch.arange(self.n)
        idx = idx.repeat_interleave(self.repeats).tolist()
        total = self.per_rank_total * self.world
        idx += idx[: total - len(idx)]
        return iter(idx[self.rank:total:self.world][: self.num_selected])

    def __len__(self) -> int:
        return self.num_selected


class ShardSampler(Sampler):
    """Evaluation sampler: rank ``r`` of ``world`` takes indices ``r, r + world, ...`` (no padding, no repeats)."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        self.n, self.world, self.rank = len(dataset), num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def build_train_sampler(dataset, world: int, rank: int, repeated_aug: bool, seed: int = 0) -> Sampler:
    """Repeated-augmentation sampler or a shuffling DistributedSampler; both take ``set_epoch``."""
    if repeated_aug:
        return RepeatedAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)


def build_loaders(train_set, val_set, batch_size: int, world: int = 1, rank: int = 0, repeated_aug: bool = False,
                  num_workers: int = 0, pin_memory: bool = False, seed: int = 0, eval_batch_size: Optional[int] = None):
    """Train loader (drop_last: Mixup needs even batches) with its sampler, and a sharded eval loader."""
    train_sampler = build_train_sampler(train_set, world, rank, repeated_aug, seed) if train_set is not None else None
    train_loader = None
    if train_set is not None:
        train_loader = DataLoader(train_set, batch_size=batch_size, sampler=train_sampler, num_workers=num_workers,
                                  pin_memory=pin_memory, drop_last=True, persistent_workers=False)
    val_loader = None
    if val_set is not None:
        val_loader = DataLoader(val_set, batch_size=eval_batch_size or int(1.5 * batch_size),
                                sampler=ShardSampler(val_set, world, rank), num_workers=num_workers,
                                pin_memory=pin_memory, drop_last=False)
    return train_loader, train_sampler, val_loader


def build_datasets(data: str, cfg: DataConfig, need_train: bool = True, eval_split: str = "val"):
    """``data`` = ``"digits"`` (the embedded set, at ``cfg.input_size``) or an ImageNet-layout folder. Returns
    (train or None, the evaluation set): for the digits, ``eval_split`` picks validation (model selection) or
    test (the final report); an ImageFolder has one evaluation folder, ``val``."""
    if data == "digits":
        train = DigitsDataset("train", size=cfg.input_size, augment=True) if need_train else None
        return train, DigitsDataset(eval_split, size=cfg.input_size)
    train = build_imagefolder(data, "train", cfg) if need_train else None
    val = build_imagefolder(data, "val", cfg)
    if train is not None and train.classes != val.classes:
        raise DataError(f"train and val class folders differ under {data}")
    return train, val
