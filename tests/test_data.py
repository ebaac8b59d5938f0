"""Tests for data.py: loaders, the on-device sampler, pixel conversions. CPU, a few seconds."""

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from data import (Batches, DataError, load_cifar10, load_dataset, load_folder,  # noqa: E402
                  save_grid, synthetic_dataset, to_float, to_uint8_images)

# a grid tile of an 8x8 image: enlarged 4x to 32 pixels for a readable grid (data.readable), then 2 of padding
TILE = 4 * 8 + 2


CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
needs_cifar = pytest.mark.skipif(not (CIFAR / "train_0.npz").is_file(),
                                 reason=f"real CIFAR-10 shards not found at {CIFAR}")


def one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- real CIFAR-10

@needs_cifar
def test_cifar10_one_shard():
    x, y = load_cifar10(CIFAR / "train_0.npz")  # a single .npz as data_dir
    assert x.shape == (10_000, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert int(x.min()) == 0 and int(x.max()) == 255
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10  # 1,000 per class per shard
    # per-channel mean of one shard is close to the full train set's (0.491, 0.482, 0.447)
    mean = x.sum(dim=(0, 2, 3), dtype=torch.int64).double() / (x.numel() / 3 * 255)
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64), atol=0.01)


@needs_cifar
def test_cifar10_test_split_via_default_lookup(monkeypatch):
    # data_dir=None finds the shared copy (the repo's own data/cifar10 is skipped if absent)
    monkeypatch.setattr(data, "DEFAULT_CIFAR10_DIRS", [ROOT / "no-such-dir", CIFAR])
    x, y = load_cifar10(split="test")
    assert x.shape == (10_000, 3, 32, 32) and y.shape == (10_000,)
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- npz handling

def fake_npz(path, n, label0=0, **override):
    rng = np.random.default_rng(n + label0)
    arrays = {"x": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
              "y": (np.arange(n) % 10).astype(np.int64)}
    arrays.update(override)
    np.savez_compressed(path, **arrays)
    return arrays


def test_single_npz_matches_content(tmp_path):
    a = fake_npz(tmp_path / "mine.npz", 12)
    x, y = load_cifar10(tmp_path / "mine.npz")
    assert torch.equal(x, torch.from_numpy(a["x"]).permute(0, 3, 1, 2))  # HWC -> CHW, same pixels
    assert torch.equal(y, torch.from_numpy(a["y"]))
    assert x.is_contiguous()


def test_dir_of_two_shards_concatenated_in_order(tmp_path):
    a0 = fake_npz(tmp_path / "train_0.npz", 5)
    a1 = fake_npz(tmp_path / "train_1.npz", 7)
    t = fake_npz(tmp_path / "test.npz", 3)
    x, y = load_cifar10(tmp_path, split="train")
    assert x.shape == (12, 3, 32, 32)
    expect = np.concatenate([a0["x"], a1["x"]]).transpose(0, 3, 1, 2)
    assert np.array_equal(x.numpy(), expect)
    xt, _ = load_cifar10(tmp_path, split="test")
    assert np.array_equal(xt.numpy(), t["x"].transpose(0, 3, 1, 2))
    xd, _ = load_dataset("cifar10", data_dir=tmp_path)  # the dispatcher takes the same path
    assert torch.equal(xd, x)


@pytest.mark.parametrize("override", [
    {"x": np.zeros((4, 32, 32, 3), np.float32)},      # wrong dtype
    {"x": np.zeros((4, 3, 32, 32), np.uint8)},        # CHW instead of HWC
    {"y": np.zeros((3,), np.int64)},                  # length mismatch
    {"y": np.full((4,), 10, np.int64)},               # label out of range
])
def test_wrong_format_npz_is_data_error(tmp_path, override):
    fake_npz(tmp_path / "bad.npz", 4, **override)
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path / "bad.npz")
    assert "--data-dir" in one_line(e)


def test_missing_keys_and_garbage_are_data_errors(tmp_path):
    np.savez(tmp_path / "nokeys.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    for name in ("nokeys.npz", "garbage.npz"):
        with pytest.raises(DataError) as e:
            load_cifar10(tmp_path / name)
        assert "--data-dir" in one_line(e)


def test_missing_or_empty_dir_is_data_error(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path / "does-not-exist")
    assert "--data-dir" in one_line(e)
    fake_npz(tmp_path / "train_0.npz", 2)
    with pytest.raises(DataError) as e:  # the dir exists but has no test.npz
        load_cifar10(tmp_path, split="test")
    assert "--data-dir" in one_line(e) and "test.npz" in str(e.value)


def test_offline_without_local_copy_is_data_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(data, "DEFAULT_CIFAR10_DIRS", [tmp_path / "nothing-here"])
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError) as e:
        load_cifar10(download_root=str(tmp_path / "dl"))
    assert "--data-dir" in one_line(e)


# ----------------------------------------------------------------------------- folder, dispatch

def test_folder_dataset_labels_and_sizes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n, size in (("cat", 2, (40, 30)), ("dog", 3, (20, 50))):  # non-square, other sizes
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "dog" / "gray.png")  # grayscale
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    x, y = load_folder(tmp_path, 16)
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.uint8
    assert y.tolist() == [0, 0, 1, 1, 1, 1]  # sorted class folders: cat=0, dog=1
    assert int(x[2:5].max()) > 0 and int(x[5].max()) == 0  # gray.png sorts last among dog's images

    x2, y2 = load_dataset("folder", data_dir=tmp_path, image_size=8)
    assert x2.shape == (6, 3, 8, 8) and torch.equal(y2, y)


def test_folder_errors(tmp_path):
    for bad in (tmp_path / "missing", tmp_path):  # missing, then empty
        with pytest.raises(DataError) as e:
            load_folder(bad, 16)
        assert "--data-dir" in one_line(e)
    with pytest.raises(DataError) as e:
        load_dataset("folder")
    assert "--data-dir" in one_line(e)
    with pytest.raises(DataError) as e:
        load_dataset("imagenet")
    assert "--dataset" in one_line(e) and "cifar10" in str(e.value)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", image_size=64)
    assert "--image-size" in one_line(e)


def test_synthetic_is_deterministic_and_class_dependent():
    x, y = synthetic_dataset(n=64, image_size=16, channels=3, num_classes=4)
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [16] * 4
    x2, y2 = synthetic_dataset(n=64, image_size=16, channels=3, num_classes=4)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, synthetic_dataset(n=64, image_size=16, num_classes=4, seed=1)[0])
    means = torch.stack([x[y == c].float().mean(0) for c in range(4)])  # [4, C, H, W] class means
    within = torch.stack([(x[y == c].float() - means[c]).abs().mean() for c in range(4)]).mean()
    between = torch.cdist(means.flatten(1), means.flatten(1), p=1) / means[0].numel()
    assert between[~torch.eye(4, dtype=torch.bool)].min() > 2 * within  # classes clearly differ
    assert synthetic_dataset(n=4, image_size=8, channels=1)[0].shape == (4, 1, 8, 8)
    xt, _ = load_dataset("synthetic", image_size=8, split="test")
    assert xt.shape[1:] == (3, 8, 8) and not torch.equal(xt, load_dataset("synthetic", image_size=8)[0])


# ----------------------------------------------------------------------------- Batches

def indexed_images(n, size=8):
    """Images whose label is their index and whose left half is dark, right half bright."""
    x = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    x[..., size // 2:] = 200
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # makes every image distinct
    return x, torch.arange(n)


def test_batches_values_shapes_and_flips():
    x, y = indexed_images(200)
    b = Batches(x, y, batch_size=50, device="cpu", seed=3)
    flipped = 0
    for _ in range(8):  # two epochs
        xb, yb = next(b)
        assert xb.shape == (50, 3, 8, 8) and xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert xb.min() >= -1 and xb.max() <= 1
        src = to_float(x[yb])
        is_flip = (xb == src.flip(3)).flatten(1).all(1)
        assert (is_flip | (xb == src).flatten(1).all(1)).all()  # each one the image or its mirror
        flipped += int(is_flip.sum())
    assert 0.4 < flipped / 400 < 0.6  # about half
    assert b.epoch == 1 and b.epochs_done == 2.0

    nb = Batches(x, y, batch_size=50, device="cpu", flip=False)
    for _ in range(4):
        xb, yb = nb.next()
        assert torch.equal(xb, to_float(x[yb]))  # never flipped


def test_batches_rank_slices_are_disjoint_and_cover_epoch():
    x, y = indexed_images(100)
    world = 3  # 100 is not a multiple of 3: 99 images per epoch, 33 per rank
    seen = []
    for rank in range(world):
        b = Batches(x, y, batch_size=11, device="cpu", seed=7, rank=rank, world_size=world)
        ys = torch.cat([b.next()[1] for _ in range(3)])  # exactly one epoch for this rank
        assert len(set(ys.tolist())) == 33
        seen.append(set(ys.tolist()))
        second = torch.cat([b.next()[1] for _ in range(3)])
        assert not torch.equal(ys, second)  # a new permutation each epoch
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert len(seen[0] | seen[1] | seen[2]) == 99


def test_batches_cross_epoch_boundary_and_larger_than_dataset():
    x, y = indexed_images(10)
    b = Batches(x, y, batch_size=25, device="cpu")
    ys = torch.cat([b.next()[1] for _ in range(2)])  # 50 samples = 5 epochs
    for e in range(5):
        assert sorted(ys[10 * e:10 * e + 10].tolist()) == list(range(10))


def test_batches_resume_reproduces_stream():
    x, y = indexed_images(23)
    kw = dict(batch_size=7, device="cpu", seed=11)
    b = Batches(x, y, **kw)
    for _ in range(5):  # 35 samples: mid-way through epoch 1
        b.next()
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)  # as a checkpoint would
    expected = [b.next() for _ in range(6)]  # crosses more epoch boundaries

    buf.seek(0)
    r = Batches(x, y, **kw)
    r.load_state_dict(torch.load(buf, weights_only=True))
    for xe, ye in expected:
        xr, yr = r.next()
        assert torch.equal(xr, xe) and torch.equal(yr, ye)

    other = Batches(x[:20], y[:20], **kw)
    with pytest.raises(DataError):  # a different dataset cannot continue this order
        other.load_state_dict(b.state_dict())


def test_batches_channels_last():
    x, y = indexed_images(16)
    a = Batches(x, y, batch_size=8, device="cpu", seed=1)
    c = Batches(x, y, batch_size=8, device="cpu", seed=1, channels_last=True)
    xa, _ = a.next()
    xc, _ = c.next()
    assert xc.is_contiguous(memory_format=torch.channels_last) and not xa.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(xa, xc)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_cuda_no_host_sync():
    x, y = synthetic_dataset(n=300, image_size=16)
    b = Batches(x, y, batch_size=64, device="cuda", channels_last=True)
    assert b.x.is_cuda
    b.next()  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(12):  # crosses epoch boundaries, which draw new permutations
            xb, yb = b.next()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert xb.is_cuda and yb.is_cuda and xb.shape == (64, 3, 16, 16)


# ----------------------------------------------------------------------------- conversions

def test_uint8_float_round_trip_is_exact():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(2, 3, 1, 1)
    f = to_float(u)
    assert f.min() == -1 and f.max() == 1
    back = to_uint8_images(f)
    assert back.dtype == np.uint8 and back.shape == (2, 16, 16, 3)
    assert np.array_equal(back, u.permute(0, 2, 3, 1).numpy())
    assert to_uint8_images(torch.tensor([-3.0, 3.0]).view(1, 1, 1, 2)).ravel().tolist() == [0, 255]


def test_save_grid_writes_png(tmp_path):
    from PIL import Image

    x = to_float(synthetic_dataset(n=5, image_size=8)[0])
    path = tmp_path / "sub" / "grid.png"
    save_grid(x, path)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no tmp left
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (5 * TILE + 2, 1 * TILE + 2)  # 5 images: one full row, padding 2
    save_grid(to_float(synthetic_dataset(n=8, image_size=8)[0]), path)
    with Image.open(path) as im:
        assert im.size == (4 * TILE + 2, 2 * TILE + 2)  # 8 images: 4x2, no empty tile
