"""Data: the embedded digits set, the ImageFolder loader with the DeiT recipe, the samplers, bad layouts."""
import os

import numpy as np
import pytest
import torch

from spvit.data import (DataConfig, DataError, DigitsDataset, RepeatedAugSampler, ShardSampler, build_datasets,
                        build_loaders, build_mixup)


def test_digits_splits_are_disjoint_deterministic_and_complete():
    train, val, test = (DigitsDataset(s, size=16) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (1257, 180, 360)
    x, y = train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and 0 <= y < 10
    again = DigitsDataset("test", size=16)
    assert torch.equal(again.images, test.images) and torch.equal(again.targets, test.targets)
    # the three index sets are disjoint and cover the 1797 images
    idx = DigitsDataset.split_indices(1797)
    sets = [set(idx[s].tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, sets)) == 1797 and len(set.union(*sets)) == 1797
    # every class is in every split, roughly balanced
    assert torch.bincount(test.targets, minlength=10).min() >= 20
    assert torch.bincount(val.targets, minlength=10).min() >= 8
    assert torch.bincount(train.targets, minlength=10).min() >= 100
    flat = {s: [tuple(v.tolist()) for v in DigitsDataset(s, size=8).images.flatten(1)]
            for s in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        seen = set(flat[a])
        assert sum(v in seen for v in flat[b]) <= 2  # the raw UCI set has a few exact duplicate bitmaps, nothing more


def test_digits_license_is_shipped():
    import spvit.data as d

    text = open(os.path.join(d.ASSETS, "DIGITS_LICENSE.md")).read()
    assert "CC BY 4.0" in text and "Alpaydin" in text and "Kaynak" in text and "archive.ics.uci.edu" in text
    with np.load(d.DIGITS_PATH) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (1797, 8, 8) and z["images"].max() == 16


def test_digits_augment_shifts_but_keeps_shape():
    ds = DigitsDataset("train", size=16, augment=True)
    torch.manual_seed(0)
    xs = [ds[3][0] for _ in range(8)]
    assert all(x.shape == (1, 16, 16) for x in xs)
    assert any(not torch.equal(xs[0], x) for x in xs[1:])


def test_repeated_aug_sampler():
    data = list(range(30))
    ranks = [RepeatedAugSampler(data, num_replicas=2, rank=r, repeats=3, seed=1) for r in range(2)]
    for s in ranks:
        s.set_epoch(0)
    got = [list(iter(s)) for s in ranks]
    assert all(len(g) == len(s) == 15 for g, s in zip(got, ranks))
    # consecutive repeats land on different ranks: rank 0 and rank 1 see the same image at the same step
    assert got[0][0] == got[1][0]
    for s in ranks:
        s.set_epoch(1)
    assert [list(iter(s)) for s in ranks] != got
    big = list(range(600))
    s = RepeatedAugSampler(big, num_replicas=4, rank=0)
    assert len(s) == len(list(iter(s))) == 512 // 4  # floor(600/256)*256 / world


def test_shard_sampler_covers_everything_once():
    data = list(range(11))
    seen = sorted(i for r in range(3) for i in ShardSampler(data, 3, r))
    assert seen == list(range(11))


def _make_imagefolder(root, classes=("cat", "dog"), n=4, size=40):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(n):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(os.path.join(root, split, c, f"{i}.png"))


def test_imagefolder_with_deit_recipe(tmp_path):
    _make_imagefolder(tmp_path)
    cfg = DataConfig(input_size=32, num_workers=0)
    train, val = build_datasets(str(tmp_path), cfg)
    assert train.num_classes == val.num_classes == 2 and len(train) == len(val) == 8
    x, y = train[0]
    assert x.shape == (3, 32, 32)
    tnames = [type(t).__name__ for t in train.transform.transforms]
    assert "RandomResizedCropAndInterpolation" in tnames and "RandAugment" in tnames and "RandomErasing" in tnames
    assert val[0][0].shape == (3, 32, 32)
    tl, sampler, vl = build_loaders(train, val, batch_size=4, repeated_aug=True)
    images, labels = next(iter(tl))
    mix = build_mixup(cfg, 2)
    mixed, targets = mix(images, labels)
    assert mixed.shape == (4, 3, 32, 32) and targets.shape == (4, 2)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    assert sum(b[0].shape[0] for b in vl) == 8


def test_bad_layouts(tmp_path):
    cfg = DataConfig(input_size=32)
    with pytest.raises(DataError, match="not found"):
        build_datasets(str(tmp_path / "missing"), cfg)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no 'train' folder"):
        build_datasets(str(tmp_path / "flat"), cfg)
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        build_datasets(str(tmp_path / "empty"), cfg)


def test_empty_or_corrupt_image_is_named(tmp_path):
    _make_imagefolder(tmp_path)
    cfg = DataConfig(input_size=32, num_workers=0)
    bad = tmp_path / "train" / sorted(os.listdir(tmp_path / "train"))[0] / "broken.png"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="empty \\(0 bytes\\)"):  # found before any training
        build_datasets(str(tmp_path), cfg)
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):  # every header is read before training
        build_datasets(str(tmp_path), cfg)
    good = bad.parent / "0.png"
    bad.write_bytes(good.read_bytes()[:200])  # a valid header, truncated pixel data: found when it is loaded
    train, _ = build_datasets(str(tmp_path), cfg)
    i = [os.path.basename(p) for p, _ in train.samples].index("broken.png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        train[i]


def _png_header_only(path, width, height):
    """A PNG that declares ``width`` x ``height`` with almost no pixel data (a decompression bomb to a reader)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


BAD_FOLDERS = [  # (what to do to a fresh 2-class folder, expected message)
    ("bomb", "decompression bomb"),
    ("one_class", "one class folder"),
    ("text", "cannot identify"),
]


@pytest.mark.parametrize("case,msg", BAD_FOLDERS, ids=[c for c, _ in BAD_FOLDERS])
def test_bad_image_folders_are_refused_before_training(case, msg, tmp_path):
    import shutil

    _make_imagefolder(tmp_path, n=2, size=8)
    target = tmp_path / "val" / "dog" / "x.png"
    if case == "bomb":
        _png_header_only(target, 60000, 60000)
    elif case == "one_class":
        shutil.rmtree(tmp_path / "val" / "dog")
    else:
        target.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=msg):
        build_datasets(str(tmp_path), DataConfig(input_size=8, num_workers=0))


def test_default_training_augmentation_never_fails():
    """The default RandAugment (``rand-m9-mstd0.5-inc1``) under the installed Pillow, on many random images: its
    magnitude noise draws 0-bit posterize now and then, which Pillow >= 13 rejects."""
    import random

    from PIL import Image

    from spvit.data import build_transform, safe_posterize

    t = build_transform(True, DataConfig(input_size=32))
    rng = np.random.default_rng(0)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for _ in range(5000):
        s = int(rng.integers(32, 65))
        img = Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8))
        x = t(img)
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
    # the op against an independent reference: keep the top `bits` bits of every channel (0 bits: black)
    arr = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    for bits in range(0, 9):
        got = np.asarray(safe_posterize(Image.fromarray(arr), bits))
        want = arr & np.uint8((0xFF << (8 - bits)) & 0xFF) if bits < 8 else arr
        assert np.array_equal(got, want), bits


BAD_AUGMENT = [({"aa": "bogus"}, "--aa 'bogus'"), ({"remode": "garbage"}, "remode"),
               ({"train_interpolation": "garbage"}, "train_interpolation"), ({"recount": 0}, "recount")]


@pytest.mark.parametrize("over,msg", BAD_AUGMENT, ids=[str(o) for o, _ in BAD_AUGMENT])
def test_bad_augmentation_settings_are_named(over, msg):
    from spvit.data import check_data_config

    check_data_config(DataConfig(input_size=32))
    with pytest.raises(DataError, match=msg.replace("(", "\\(")):
        check_data_config(DataConfig(input_size=32, **over))
