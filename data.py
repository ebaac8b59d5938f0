"""
Datasets and the on-device batch sampler.

Every loader returns the WHOLE dataset as one uint8 tensor ``x`` [N, C, H, W] (contiguous NCHW) and one int64 tensor
``y`` [N] of labels; ``Batches`` moves it to the device once and draws every batch there (permutation, gather, flip,
uint8 -> float) without reading a value back to the host. Why (a U-Net on 32x32 images eats more images per second
than DataLoader workers can decode): docs/data.md.

Pixel convention (the one place it is defined; see ``to_float`` / ``to_uint8_images``):
    float = uint8 / 127.5 - 1          uint8 in {0..255}  ->  float in [-1, 1]
    uint8 = round((float + 1) * 127.5), clamped to [0, 255]
The round trip uint8 -> float -> uint8 is exact. The FID reference statistics of this project were
computed feeding exactly ``x / 127.5 - 1`` to the Inception network, so generated samples should be
turned into uint8 with ``to_uint8_images`` before any FID computation, as real images are.

Sources (``load_dataset(name, ...)``; ``with_source=True`` also returns what was read, in words):
    cifar10    real CIFAR-10 from .npz shards (offline copy), or torchvision's download
    folder     any folder of images (class subfolders -> labels), resized + center-cropped
    digits     scikit-learn's 1,797 handwritten digits (8x8, grey, bundled: no download), upsampled: learns on a CPU
    synthetic  a tiny deterministic class-dependent dataset for tests and smoke runs

Files a user hands over are read by two checked readers: ``read_npz`` (every array's .npy header is checked before
its data is read, and only the arrays asked for are read) and ``read_picture`` (a picture's size is checked from its
header before a pixel is decoded, and any pixel format is read as the 8-bit picture a viewer shows).

Every problem a user can fix from the command line raises ``DataError`` with a one-line message
that names the flag and the fix; train.py catches it and exits with status 2.
"""

import math
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent

# Places searched, in order, when load_cifar10 gets no data_dir. Module-level so tests can patch it.
DEFAULT_CIFAR10_DIRS = [REPO / "data" / "cifar10", REPO.parent / "shared" / "data" / "cifar10"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")  # torchvision's order, labels 0..9

DATASETS = ("cifar10", "digits", "folder", "synthetic")

# Datasets whose images mean the same mirrored, so a random horizontal flip is a free augmentation (DDPM §4 flips
# CIFAR-10). Handwritten digits are not mirror-symmetric: a flipped 2 or 7 is not a digit.
NOT_MIRRORED = ("digits",)


def flips(name):
    """Whether training batches of --dataset `name` are flipped at random (DDPM's only augmentation)."""
    return name not in NOT_MIRRORED

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")

_NPZ_HELP = ("pass --data-dir DIR holding train_*.npz/test.npz (or a single .npz with x,y), "
             "or run online so torchvision can download it")


class DataError(ValueError):
    """A user-facing data problem. The message is one line naming the flag and the fix."""


# -----------------------------------------------------------------------------
# pixel conversions

def to_float(x_uint8):
    """uint8 [..] in {0..255} -> float32 in [-1, 1]: x / 127.5 - 1 (same device, same layout)."""
    return x_uint8.float().div_(127.5).sub_(1.0)


def to_uint8_images(x):
    """float [N, C, H, W] in [-1, 1] -> uint8 numpy [N, H, W, C] (round, clamp): what FID tools read.

    Exact inverse of ``to_float`` on uint8 inputs. Values outside [-1, 1] are clamped.
    """
    x = x.detach().float()
    x = ((x + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def grid_columns(n):
    """Images per row for a grid of n: the smallest divisor of n that is >= sqrt(n), so every row is full (8 -> 4x2,
    64 -> 8x8, 6 -> 3x2), unless that makes a strip more than 3x wider than square (61 images): then ceil(sqrt(n))."""
    root = math.sqrt(n)
    for d in range(max(1, math.ceil(root)), n + 1):
        if n % d == 0:
            return d if d <= 3 * root else max(1, math.ceil(root))
    return 1


# A grid of 8x8 or 16x16 images (--dataset digits) is a postage stamp at 1:1; grids of images smaller than this are
# drawn with each pixel repeated (nearest neighbour: no invented detail) up to at least this side.
READABLE_SIDE = 32


def readable(x):
    """x [N, C, H, W] (any dtype) with each pixel repeated k = ceil(READABLE_SIDE / H) times along both axes, for a
    grid a person can read; unchanged from 32 pixels up (CIFAR-10's grids stay 1:1)."""
    k = -(-READABLE_SIDE // x.shape[-2])
    return x if k <= 1 else x.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def save_grid(x, path, nrow=None):
    """Write a PNG grid of images x (float [N, C, H, W] in [-1, 1], or uint8) to path, atomically.

    nrow (images per row) defaults to grid_columns(N): a full grid when N allows one. The file is
    written to a temporary name in the same directory and then renamed, so a reader never sees a
    half-written PNG.
    """
    import torchvision.utils

    x = x.detach()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else ((x.float() + 1.0) / 2.0).clamp(0, 1)
    x = readable(x)
    if nrow is None:
        nrow = grid_columns(x.shape[0])
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torchvision.utils.save_image(x.cpu(), tmp, nrow=nrow, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# CIFAR-10

def _hwc_to_tensors(x, y):
    """numpy uint8 [N, H, W, C] + integer [N] -> (uint8 tensor [N, C, H, W] contiguous, int64 [N])."""
    x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.asarray(y, dtype=np.int64).copy())
    return x, y


# .npz files are zip archives of .npy files, each a small header (dtype, shape) followed by the array's bytes. A
# header can claim any shape (10^11 images) and a member can decompress to far more than the file's size (gigabytes
# of zeros fit in a few megabytes), so nothing is read on trust: every header is read first, alone (a few hundred
# bytes of each member), and an array is read only if it is one that was asked for, is no pickled Python object, and
# fits in this machine's memory and in the bytes its member holds.

NPY_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class NpyHeader:
    """What the .npy header of an .npz member says: the array's shape and dtype; and `stored`, the bytes of data the
    member holds after its header (its uncompressed size, from the zip directory)."""

    def __init__(self, shape, dtype, stored):
        self.shape, self.dtype, self.stored = tuple(shape), dtype, stored

    @property
    def nbytes(self):
        """The bytes the array claims: its element count times the item size (Python ints: no overflow)."""
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self):
        """'uint8 [4, 32, 32, 3]': how the messages name an array."""
        return f"{self.dtype} {list(self.shape)}"


def human_bytes(n):
    """A size a person reads at a glance: '64 bytes', '1.5 kB', '279.4 TB' (binary units, as cli.wrote)."""
    if n < 1024:
        return f"{n} bytes"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        n /= 1024
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}"


def memory_bytes():
    """This machine's physical memory in bytes (64 GB where the system does not say): no array read may exceed it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 * 2 ** 30


def _check_npz_path(path, flag, fix):
    """A missing path, or a folder where an .npz is expected, is named as such."""
    if os.path.isdir(path):
        raise DataError(f"{flag}: {path} is a directory, not an .npz file{fix}")
    if not os.path.isfile(path):
        raise DataError(f"{flag}: {path} does not exist{fix}")


def _read_npy_header(zf, info):
    """The NpyHeader of one .npy member: only its first few hundred bytes are decompressed."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in NPY_READERS:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, _, dtype = NPY_READERS[version](f)
        return NpyHeader(shape, dtype, info.file_size - f.tell())


def npz_headers(path, flag="--data-dir", fix=""):
    """{name: NpyHeader} of every array in an .npz, from the .npy headers alone: no array's data is read.

    A missing file, a folder, or a file that is no .npz -> DataError naming `flag` (and `fix` after a '; ')."""
    fix = f"; {fix}" if fix else ""
    _check_npz_path(path, flag, fix)
    try:
        with zipfile.ZipFile(path) as zf:
            return {info.filename[:-4]: _read_npy_header(zf, info)
                    for info in zf.infolist() if info.filename.endswith(".npy")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as e:
        raise DataError(f"{flag}: cannot read {path} as .npz ({type(e).__name__}){fix}") from None


def _check_readable(name, head, path, flag, fix):
    """An array is read only if it is plain data that fits in this machine's memory and in the bytes it holds."""
    if head.dtype.hasobject:
        raise DataError(f"{flag}: {path}: array {name} holds Python objects (pickled), which are never read{fix}")
    limit = memory_bytes()
    if head.nbytes > limit:
        raise DataError(f"{flag}: {path}: array {name} claims {head.describe()} ({human_bytes(head.nbytes)}), more "
                        f"than this machine's memory ({human_bytes(limit)}){fix}")
    if head.nbytes > head.stored:
        raise DataError(f"{flag}: {path}: array {name} claims {head.describe()} ({human_bytes(head.nbytes)}) but "
                        f"holds only {human_bytes(max(head.stored, 0))} of data: the file is truncated or corrupt{fix}")


def check_npz_arrays(heads, keys, path, flag="--data-dir", fix=""):
    """The checks read_npz makes before reading the arrays `keys` (headers from npz_headers), for a caller that reads
    them later but wants a bad file refused now, before its work."""
    fix = f"; {fix}" if fix else ""
    for k in keys:
        _check_readable(k, heads[k], path, flag, fix)


def read_npz(path, flag="--data-dir", fix="", keys=None):
    """The arrays `keys` of an .npz file (all of them when None) as a dict; nothing else in the file is read.

    The one .npz reader of the project: CIFAR-10 shards here, samples and FID statistics in evaluate.py. Every array's
    header is checked (npz_headers, _check_readable) before its data is read; a missing, unreadable or dishonest
    file -> DataError naming `flag`.
    """
    heads = npz_headers(path, flag, fix)
    fix = f"; {fix}" if fix else ""
    missing = [k for k in keys or () if k not in heads]
    if missing:
        raise DataError(f"{flag}: {path} has arrays {sorted(heads)}, not {' and '.join(keys)}{fix}")
    keys = list(keys or heads)
    for k in keys:
        _check_readable(k, heads[k], path, flag, fix)  # before any data is read
    try:
        with np.load(path, allow_pickle=False) as f:  # lazy: each f[k] decompresses that member alone
            return {k: f[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{flag}: cannot read {path} as .npz ({type(e).__name__}){fix}") from None


def _read_cifar_npz(path):
    """Read and validate one CIFAR-style .npz: x uint8 [N, 32, 32, 3] (HWC, RGB), y int [N] in 0..9."""
    fix = "pass --data-dir with .npz files holding x uint8 [N,32,32,3] (HWC RGB) and y int64 [N]"
    arrays = read_npz(path, "--data-dir", fix, keys=("x", "y"))
    x, y = arrays["x"], arrays["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DataError(f"--data-dir: {path} has x {x.dtype} {list(x.shape)}, "
                        f"expected uint8 [N,32,32,3]; {fix}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
        raise DataError(f"--data-dir: {path} has y {y.dtype} {list(y.shape)}, "
                        f"expected int64 [{x.shape[0]}]; {fix}")
    if x.shape[0] == 0:
        raise DataError(f"--data-dir: {path} holds no images; {fix}")
    if y.min() < 0 or y.max() >= len(CIFAR10_CLASSES):
        raise DataError(f"--data-dir: {path} has labels in [{y.min()}, {y.max()}], expected 0..9; {fix}")
    return x, y


def _shard_key(p):
    """Sort train_2.npz before train_10.npz (numeric order), then by name."""
    m = re.search(r"(\d+)$", p.stem)
    return (int(m.group(1)) if m else -1, p.name)


def _npz_files(directory, split):
    """The .npz files of one split in a directory ([] if none): train_*.npz shards, or test.npz."""
    if split == "train":
        return sorted(directory.glob("train_*.npz"), key=_shard_key)
    return [directory / "test.npz"] if (directory / "test.npz").is_file() else []


def _load_npz_files(files):
    """(x, y, source): the files' images and labels, and the files in words."""
    source = str(files[0]) if len(files) == 1 else f"{files[0].parent}/{{{', '.join(f.name for f in files)}}}"
    xs, ys = zip(*(_read_cifar_npz(f) for f in files))
    x = xs[0] if len(xs) == 1 else np.concatenate(xs)
    y = ys[0] if len(ys) == 1 else np.concatenate(ys)
    return (*_hwc_to_tensors(x, y), source)


def _load_torchvision(root, split, download):
    import torchvision.datasets

    ds = torchvision.datasets.CIFAR10(root, train=(split == "train"), download=download)
    source = f"{Path(root) / 'cifar-10-batches-py'} (torchvision{', downloaded' if download else ''})"
    return (*_hwc_to_tensors(ds.data, ds.targets), source)


def load_cifar10(data_dir=None, split="train", download_root="data", with_source=False):
    """Load CIFAR-10 -> (x uint8 [N, 3, 32, 32] contiguous NCHW, y int64 [N]), and with_source=True the files read, in
    words, third (for a script to announce which of the searched places held the data).

    Lookup order:
      1. data_dir if given: a single .npz file (x, y), or a directory with train_*.npz shards (all
         shards, concatenated in numeric order, for split="train"; any number of them) or test.npz
         (split="test"), or torchvision's extracted cifar-10-batches-py. Nothing usable -> DataError.
      2. otherwise the default local places DEFAULT_CIFAR10_DIRS (<repo>/data/cifar10, then
         <repo>/../shared/data/cifar10), skipping those without files for the split;
      3. otherwise torchvision.datasets.CIFAR10(download_root, download=True); offline -> DataError.
    """
    x, y, source = _find_cifar10(data_dir, split, download_root)
    return (x, y, source) if with_source else (x, y)


def _find_cifar10(data_dir, split, download_root):
    """load_cifar10's search: (x, y, source)."""
    if split not in ("train", "test"):
        raise DataError(f"split: got {split!r}, expected 'train' or 'test'")

    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if path.is_file():
            return _load_npz_files([path])
        if not path.is_dir():
            raise DataError(f"--data-dir: {path} does not exist; {_NPZ_HELP}")
        files = _npz_files(path, split)
        if files:
            return _load_npz_files(files)
        for root in (path, path.parent):  # data_dir is torchvision's root, or the extracted folder
            if (root / "cifar-10-batches-py").is_dir():
                try:
                    return _load_torchvision(root, split, download=False)
                except Exception as e:
                    msg = " ".join(str(e).split())[:200]  # keep the message on one line
                    raise DataError(f"--data-dir: cannot read {root / 'cifar-10-batches-py'} "
                                    f"({type(e).__name__}: {msg}); {_NPZ_HELP}") from None
        want = "train_*.npz" if split == "train" else "test.npz"
        raise DataError(f"--data-dir: no {want} in {path}; {_NPZ_HELP}")

    for d in DEFAULT_CIFAR10_DIRS:
        files = _npz_files(Path(d), split) if Path(d).is_dir() else []
        if files:
            return _load_npz_files(files)

    try:
        return _load_torchvision(download_root, split, download=True)
    except Exception as e:  # offline: URLError, socket errors, RuntimeError on a corrupt archive...
        where = ", ".join(str(d) for d in DEFAULT_CIFAR10_DIRS)
        raise DataError(f"--data-dir: no CIFAR-10 found (looked in {where}; download to "
                        f"{download_root} failed: {type(e).__name__}); {_NPZ_HELP}") from None


# -----------------------------------------------------------------------------
# image folder

def load_folder(data_dir, image_size, with_source=False):
    """Load every image under data_dir -> (x uint8 [N, 3, S, S], y int64 [N]), S = image_size (and with_source=True
    the folder in words, third).

    Images inside subfolders get the label of their top-level subfolder, classes numbered by
    sorted subfolder name (like torchvision's ImageFolder; nested folders are searched too).
    Images lying directly in data_dir get label 0. Each image is converted to RGB, its shorter side
    resized to image_size (bicubic, antialiased) and center-cropped to image_size x image_size.
    Everything is decoded up front and held in memory as uint8.
    """
    from PIL import Image
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    fix = "pass --data-dir DIR holding images (optionally in one subfolder per class)"
    if data_dir is None:
        raise DataError(f"--data-dir: --dataset folder needs a folder of images; {fix}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir: {root} is not a directory; {fix}")

    def is_image(p):
        return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")

    files = [(p, 0) for p in sorted(root.iterdir()) if is_image(p)]
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = [c for c in classes if any(is_image(p) for p in (root / c).rglob("*"))]
    for label, c in enumerate(classes):
        files += [(p, label) for p in sorted((root / c).rglob("*")) if is_image(p)]
    if not files:
        raise DataError(f"--data-dir: no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}; {fix}")

    x = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    for i, (p, _) in enumerate(files):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
        except Exception as e:
            raise DataError(f"--data-dir: cannot read image {p} ({type(e).__name__}); "
                            f"remove it or {fix}") from None
        im = TF.resize(im, image_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        x[i] = np.asarray(TF.center_crop(im, image_size))
    source = f"{root} ({len(files)} images, {max(len(classes), 1)} classes)"
    x, y = _hwc_to_tensors(x, [label for _, label in files])
    return (x, y, source) if with_source else (x, y)


# -----------------------------------------------------------------------------
# one picture (sample.py's --edit, --invert and --mask)

# The largest picture read: 4096 x 4096 pixels (16.8 megapixels; any shape of at most that many pixels). The networks
# here take 32x32 to 256x256 images, so a larger picture would only be decoded to be shrunk, at hundreds of MB (PIL's
# own guard stops only at 179 megapixels, with a traceback). The size is in the file's header, which PIL's lazy
# Image.open reads alone: a picture over the limit is refused before a single pixel is decoded.
MAX_PICTURE_SIDE = 4096
MAX_PICTURE_PIXELS = MAX_PICTURE_SIDE ** 2

# 16-bit grey pictures (PNG, TIFF, PGM) open in these modes, with values 0..65535 (PIL scales a PGM's maxval to it)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _check_picture_path(path, flag, fix):
    """A missing path, a folder and a non-file each say what they are."""
    if os.path.isdir(path):
        raise DataError(f"{flag}: {path} is a directory{fix}")
    if not os.path.exists(path):
        raise DataError(f"{flag}: {path} does not exist{fix}")
    if not os.path.isfile(path):
        raise DataError(f"{flag}: {path} is not a regular file{fix}")


def _open_picture_header(path, flag, fix):
    """PIL's lazy Image.open: the header is parsed (format, mode, size), no pixel is decoded yet."""
    from PIL import Image, UnidentifiedImageError

    if os.path.getsize(path) == 0:
        raise DataError(f"{flag}: cannot read {path}: the file is empty{fix}")
    # PIL's own guard (a traceback at 179 megapixels) is off while the header is read: the stricter limit is checked
    # right after, on the size the header states, and the message names it (restored at once: nothing else runs)
    guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise DataError(f"{flag}: cannot read {path}: not a picture (no format PIL reads starts like it){fix}"
                        ) from None
    except OSError as e:
        raise DataError(f"{flag}: cannot read {path} ({e.strerror or e}){fix}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = guard


def _picture_limit():
    """The size limit, in words."""
    return (f"{MAX_PICTURE_PIXELS / 1e6:.1f}-megapixel limit ({MAX_PICTURE_SIDE}x{MAX_PICTURE_SIDE}): shrink it to "
            f"at most {MAX_PICTURE_SIDE}x{MAX_PICTURE_SIDE} pixels")


def _check_picture_size(im, path, flag, fix):
    """The header's width x height against MAX_PICTURE_PIXELS, before decoding."""
    w, h = im.size
    if w * h > MAX_PICTURE_PIXELS:
        raise DataError(f"{flag}: {path} is {w}x{h} ({w * h / 1e6:.1f} megapixels), over the {_picture_limit()}{fix}")


def _over_white(im):
    """A picture with alpha as a viewer shows it on a white page: colour * alpha + white * (1 - alpha), rounded.
    (Dropping the alpha instead would show whatever colour a transparent pixel happens to store, often black.)"""
    from PIL import Image

    rgba = np.asarray(im.convert("LA" if im.mode in ("LA", "La") else "RGBA"), dtype=np.float64)
    colour, alpha = rgba[..., :-1], rgba[..., -1:]
    out = np.round((colour * alpha + 255.0 * (255.0 - alpha)) / 255.0).astype(np.uint8)
    return Image.fromarray(out[..., 0] if out.shape[-1] == 1 else out)


def _sixteen_bit_grey(im, path, flag, fix):
    """16-bit grey (0..65535) -> 8-bit grey: round(v * 255 / 65535), so 65535 is white and 257 * k is exactly k.
    (PIL's convert clips instead: every value above 255 turned white.)"""
    from PIL import Image

    v = np.asarray(im)
    if v.size and (v.min() < 0 or v.max() > 65535):  # mode I holds 32-bit integers: none of the 16-bit formats
        raise DataError(f"{flag}: {path} has 32-bit integer pixels (values {v.min()}..{v.max()}); save it with 8 or "
                        f"16 bits per channel{fix}")
    return Image.fromarray(np.round(v.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8))


def _to_8_bit(im, path, flag, fix):
    """Any PIL mode -> 8-bit "L" or "RGB", as a viewer shows the picture.

    16-bit grey: scaled by its bit depth (_sixteen_bit_grey). Alpha (RGBA, LA, a palette with transparent entries):
    composited over white (_over_white). Palettes, 1-bit, CMYK, YCbCr, 16-bit RGB (PIL keeps each value's high byte):
    PIL's conversions. Floating-point pixels, whose range no file states, are refused.
    """
    mode = im.mode
    if mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_grey(im, path, flag, fix)
    if mode == "F":
        raise DataError(f"{flag}: {path} has floating-point pixels, whose range no file states; save it with 8 or "
                        f"16 bits per channel{fix}")
    if mode == "P" and "transparency" in im.info or mode == "PA":
        return _over_white(im.convert("RGBA"))
    if mode in ("RGBA", "RGBa", "LA", "La"):
        return _over_white(im)
    if mode in ("L", "RGB"):
        return im
    return im.convert("L" if mode == "1" else "RGB")


def read_picture(path, mode="RGB", flag="--edit", fix="pass a picture file"):
    """The picture file `path` as an 8-bit PIL image in `mode` ("RGB" or "L"), as a viewer shows it (_to_8_bit).

    Checked in this order, each problem a DataError naming `flag` (then `fix` after a '; '): the path (missing, a
    folder), the header (empty file, not a picture, more than MAX_PICTURE_PIXELS: before any pixel is decoded), the
    pixels (truncated or corrupt data, pixels without an 8-bit meaning). "L" from colour is PIL's luminance (ITU-R
    601-2: 0.299 R + 0.587 G + 0.114 B).
    """
    fix = f"; {fix}" if fix else ""
    _check_picture_path(path, flag, fix)
    with _open_picture_header(path, flag, fix) as im:
        _check_picture_size(im, path, flag, fix)
        try:
            im.load()  # the decoding: a corrupt file fails here, with whichever exception its decoder raises
            picture = _to_8_bit(im, path, flag, fix)
            return picture.convert(mode)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 (PIL's decoders raise OSError, ValueError, SyntaxError, struct.error...)
            message = " ".join(str(e).split())[:120]  # one line, short
            raise DataError(f"{flag}: cannot read {path} ({type(e).__name__}: {message}){fix}") from None


# -----------------------------------------------------------------------------
# digits

DIGITS_TEST = 297  # the last 297 of the 1,797 digits are held out (split="test"); the first 1,500 train


def load_digits(image_size=16, split="train", with_source=False):
    """scikit-learn's handwritten digits -> (x uint8 [N, 1, S, S], y int64 [N]): 1,797 real 8x8 grey images of the
    digits 0-9 (UCI's optical digits, 43 writers), bundled inside scikit-learn, so nothing is downloaded.

    Each pixel counts the ink in a 4x4 block of the 32x32 scan: 0 (paper) .. 16 (ink), scaled here to 0 .. 255, so
    data.to_float maps paper to -1 and ink to +1. Upsampled bilinearly to `image_size` (a multiple of 8; the digits
    recipe: 16, so the U-Net has a 16 -> 8 level to work at). One channel: grey data needs no colour, and a 3-channel
    model spends its first minutes learning that R = G = B. split="train": the first 1,500; "test": the last 297.
    """
    if image_size % 8 or image_size < 8:
        raise DataError(f"--image-size: the digits are 8x8, upsampled by a whole factor; got {image_size}, pass "
                        f"a multiple of 8 (the digits recipe: 16)")
    try:
        from sklearn.datasets import load_digits as sklearn_digits  # noqa: PLC0415 (only this dataset needs it)
    except ImportError:
        raise DataError("--dataset digits: needs scikit-learn; pip install scikit-learn") from None
    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images).float().unsqueeze(1) * (255.0 / 16.0)    # [1797, 1, 8, 8] in 0..255
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).contiguous()
    y = torch.from_numpy(bunch.target).long()
    keep = slice(None, -DIGITS_TEST) if split == "train" else slice(-DIGITS_TEST, None)
    source = (f"scikit-learn's handwritten digits ({split}: {len(y[keep])} of {len(y)}, 8x8 -> "
              f"{image_size}x{image_size}, grey)")
    x, y = x[keep].contiguous(), y[keep].contiguous()
    return (x, y, source) if with_source else (x, y)


# -----------------------------------------------------------------------------
# synthetic

def synthetic_dataset(n=256, image_size=16, channels=3, num_classes=2, seed=0):
    """A tiny deterministic dataset -> (x uint8 [n, channels, S, S], y int64 [n]).

    Class c (labels cycle 0, 1, ..., num_classes-1) is a smooth colour gradient along the
    direction at angle 2*pi*c/num_classes over a tint of a class-specific hue, plus a bright Gaussian blob
    near a class-specific position; each sample jitters the blob, the contrast and the brightness
    and adds a little pixel noise. Easy for a small model to learn, clearly different per class,
    and identical for identical arguments on every machine (CPU generator).
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    theta = 2 * math.pi * y.double() / num_classes                      # [n] class angle
    coords = torch.linspace(-1, 1, image_size, dtype=torch.float64)
    v, u = torch.meshgrid(coords, coords, indexing="ij")                # v: rows, u: columns
    cos, sin = theta.cos().view(n, 1, 1, 1), theta.sin().view(n, 1, 1, 1)

    grad = (cos * u + sin * v) / math.sqrt(2)                           # [n,1,S,S] in [-1, 1]
    hue = torch.arange(channels, dtype=torch.float64) * 2 * math.pi / max(channels, 1)
    colour = torch.cos(theta.view(n, 1) + hue.view(1, channels)).view(n, channels, 1, 1)
    contrast = 0.5 + 0.2 * torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64)
    img = 0.3 * colour + contrast * colour * grad                       # class tint + gradient

    centre = 0.45 * torch.stack([cos, sin])                             # [2,n,1,1,1]
    centre = centre + 0.1 * torch.randn(centre.shape, generator=g, dtype=torch.float64)
    r2 = (u - centre[0]) ** 2 + (v - centre[1]) ** 2
    img = img + 0.6 * torch.exp(-r2 / (2 * 0.25 ** 2))                  # bright blob, all channels

    img = img + 0.1 * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)  # brightness
    img = img + 0.03 * torch.randn(img.shape, generator=g, dtype=torch.float64)  # pixel noise
    x = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    return x, y.long()


# -----------------------------------------------------------------------------
# dispatch

def load_dataset(name, data_dir=None, image_size=32, split="train", synthetic_n=256, with_source=False):
    """(x uint8 [N, C, S, S], y int64 [N]) for --dataset name in DATASETS; with_source=True adds what it actually read,
    in words (the files found, or the source), third.

    cifar10: see load_cifar10 (image_size must be 32). folder: see load_folder (split is ignored:
    the folder is the data). synthetic: synthetic_n images of image_size; split="test" draws a different
    seed, so it is held-out data of the same distribution. Number of classes: int(y.max()) + 1
    (10 for CIFAR-10).
    """
    if name == "cifar10":
        if image_size != 32:
            raise DataError(f"--image-size: CIFAR-10 images are 32x32, got {image_size}; pass "
                            f"--image-size 32 (or use --dataset folder to resize other images)")
        return load_cifar10(data_dir, split=split, with_source=with_source)
    if name == "digits":
        if data_dir is not None:
            raise DataError("--data-dir: --dataset digits ships inside scikit-learn; drop --data-dir")
        return load_digits(image_size, split, with_source=with_source)
    if name == "folder":
        return load_folder(data_dir, image_size, with_source=with_source)
    if name == "synthetic":
        source = f"synthetic ({synthetic_n} generated images, seed {0 if split == 'train' else 1})"
        x, y = synthetic_dataset(n=synthetic_n, image_size=image_size, seed=0 if split == "train" else 1)
        return (x, y, source) if with_source else (x, y)
    raise DataError(f"--dataset: unknown dataset {name!r}; pass one of {', '.join(DATASETS)}")


def load_dataset_and_source(name, data_dir=None, image_size=32, split="train", synthetic_n=256):
    """(x, y, source): load_dataset, and what it actually read in words (the files found, or the source), for a
    script to announce which of the searched places held the data."""
    return load_dataset(name, data_dir, image_size, split, synthetic_n, with_source=True)


# -----------------------------------------------------------------------------
# the on-device sampler

class Batches:
    """Infinite iterator of training batches drawn on the device from a device-resident uint8 set.

        batches = Batches(x, y, batch_size=128, device="cuda")
        xb, yb = next(batches)      # xb float32 [B, C, H, W] in [-1, 1] on device, yb int64 on device

    Order. Training runs in epochs. Epoch e uses a random permutation of the N images drawn on the
    device by a torch.Generator seeded from (seed, e) alone, and, with flip=True, one random flip
    bit per position drawn from the same generator. The permutation is cut to a multiple of
    world_size (at most world_size - 1 random images sit out each epoch) and rank r takes
    positions r, r + world_size, ...: the ranks' slices are disjoint and cover the epoch. All ranks
    must pass the same seed. A batch that crosses the end of an epoch takes the rest of this epoch
    and the start of the next, so batch_size may exceed the epoch and no image is dropped.

    Because epoch e's permutation and flips are a pure function of (seed, e), the whole stream is
    a pure function of (seed, epoch, pos): ``state_dict()`` is just those numbers (plus N and
    world_size, checked on load). It is the same on every rank, so a checkpoint written by rank 0
    resumes every rank exactly, and a resumed run draws exactly the batches an uninterrupted run
    would have drawn. (The stream differs between CPU and CUDA: their generators differ.)

    Hot path. ``next()`` only slices precomputed device tensors with Python ints, gathers, flips
    with torch.where and converts to float: no .item(), no host sync, so the CPU can run ahead of
    the GPU. Once per epoch it draws the next permutation, still without a sync.

    Args:
        x: uint8 [N, C, H, W] images (any device; copied to `device` once).
        y: int labels [N] (copied to `device` once as int64).
        batch_size: images per batch on this rank.
        device: where the data lives and batches are made ("cuda", "cuda:1", "cpu", ...).
        seed: data-order seed, identical on all ranks.
        rank, world_size: this process's slice of every epoch (DDP); defaults: one process.
        flip: random horizontal flips with probability 1/2 per image.
        channels_last: return x in torch.channels_last memory format (same shape and values).
    """

    def __init__(self, x, y, batch_size, device, seed=0, rank=0, world_size=1, flip=True,
                 channels_last=False):
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"Batches wants x uint8 [N, C, H, W], got {x.dtype} {list(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"Batches wants y [{x.shape[0]}], got {list(y.shape)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if x.shape[0] < world_size:
            raise DataError(f"--data-dir: {x.shape[0]} images cannot be split over {world_size} "
                            f"processes; use a dataset with at least one image per process")
        if batch_size < 1:
            raise DataError(f"--batch-size: must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.x = x.to(self.device).contiguous()               # the dataset, resident on the device
        self.y = y.to(self.device, torch.int64)
        self.n = x.shape[0]
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.flip, self.channels_last = flip, channels_last
        self.per_rank = self.n // world_size                  # images per rank per epoch
        self._gen = torch.Generator(device=self.device)
        self._start_epoch(0)

    def _start_epoch(self, epoch):
        """Draw epoch `epoch`'s permutation (and flip bits) and take this rank's slice of them."""
        self.epoch, self.pos = epoch, 0
        self._gen.manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))  # same on all ranks
        used = self.per_rank * self.world_size
        perm = torch.randperm(self.n, generator=self._gen, device=self.device)[:used]
        self._order = perm[self.rank::self.world_size].contiguous()      # [per_rank] image indices
        if self.flip:
            bits = torch.rand(used, generator=self._gen, device=self.device) < 0.5
            self._flips = bits[self.rank::self.world_size].contiguous()  # [per_rank] bool

    def next(self):
        """The next batch: (x float32 [B, C, H, W] in [-1, 1], y int64 [B]), both on the device."""
        idx, flips, need = [], [], self.batch_size
        while need > 0:  # one pass unless the batch crosses an epoch boundary
            if self.pos == self.per_rank:
                self._start_epoch(self.epoch + 1)
            take = min(need, self.per_rank - self.pos)
            idx.append(self._order[self.pos:self.pos + take])
            if self.flip:
                flips.append(self._flips[self.pos:self.pos + take])
            self.pos += take
            need -= take
        idx = idx[0] if len(idx) == 1 else torch.cat(idx)

        xb, yb = self.x[idx], self.y[idx]                    # gather on the device, still uint8
        if self.flip:
            mask = (flips[0] if len(flips) == 1 else torch.cat(flips)).view(-1, 1, 1, 1)
            xb = torch.where(mask, xb.flip(3), xb)            # mirror the width axis where mask
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)  # cheap on uint8; float keeps it
        return to_float(xb), yb

    __next__ = next

    def __iter__(self):
        return self

    @property
    def epochs_done(self):
        """Fractional epochs consumed by this rank (for logging)."""
        return self.epoch + self.pos / self.per_rank

    def state_dict(self):
        """Everything needed to continue the exact same stream (plain ints; torch.save-able)."""
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos,
                "n": self.n, "world_size": self.world_size}

    def load_state_dict(self, state):
        """Continue from state_dict(): the next batches equal those an uninterrupted run draws."""
        if state["n"] != self.n or state["world_size"] != self.world_size:
            raise DataError(f"--resume: the checkpoint's data order is for {state['n']} images on "
                            f"{state['world_size']} processes, this run has {self.n} on "
                            f"{self.world_size}; resume with the same data and number of processes")
        self.seed = int(state["seed"])
        self._start_epoch(int(state["epoch"]))
        self.pos = int(state["pos"])
        if not 0 <= self.pos <= self.per_rank:
            raise ValueError(f"Batches state has pos {self.pos} outside [0, {self.per_rank}]")
