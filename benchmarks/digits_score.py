"""
Does a digits model draw digits? A classifier trained on the real digits labels the generated ones.

    python benchmarks/digits_score.py runs/digits/samples/ddim50_seed0.npz [more.npz ...]

The classifier is scikit-learn's LogisticRegression on the 8x8 digits of data.load_digits' training split (1,500
images), checked on its 297 held-out images. Each generated 16x16 sample is brought back to the classifier's 8x8
grid by 2x2 average pooling (the adjoint of the loader's 2x bilinear upsampling, up to its edge rows), then labelled.
Two numbers per file, the same two for the held-out real digits and for uniform noise as the ends of the scale:

    confidence   mean over samples of max_k p(k | x): near the real digits' value when the samples look like digits
                 to the classifier, near noise's when they do not
    spread       entropy of the predicted-class histogram / log 10: 1 when all ten digits are drawn equally often,
                 0 when every sample is the same digit (mode collapse); the counts per digit are printed beside it

This is a sanity measurement for a CPU-sized model, not a quality metric like FID: a classifier can be confident on
strokes a person would not read, so look at the grid (samples.png) too.
"""

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402  (the repository's loader: the same split and scaling as training)


def to_classifier_grid(x_uint8):
    """uint8 [N, H, W, C] or [N, C, H, W] images (H a multiple of 8) -> float [N, 64] on scikit-learn's 0..16 scale:
    the channels averaged, then H/8 x H/8 average pooling down to 8x8."""
    x = np.asarray(x_uint8, dtype=np.float64)
    if x.shape[-1] in (1, 3):          # sample.py's .npz is NHWC
        x = x.mean(axis=-1)
    else:                              # the loader's NCHW
        x = x.mean(axis=1)
    n, h = x.shape[0], x.shape[1]
    k = h // 8
    x = x.reshape(n, 8, k, 8, k).mean(axis=(2, 4))
    return x.reshape(n, 64) * (16.0 / 255.0)


def scores(clf, features):
    """(mean max-confidence, normalised class entropy, counts per class) of the classifier on `features`."""
    p = clf.predict_proba(features)
    counts = np.bincount(p.argmax(1), minlength=10)
    freq = counts / counts.sum()
    entropy = -sum(f * math.log(f) for f in freq if f > 0) / math.log(10)
    return float(p.max(1).mean()), float(entropy), counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("samples", nargs="*", help=".npz files written by sample.py (x uint8 [N, H, W, C])")
    args = p.parse_args(argv)
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    x_train, y_train = data.load_digits(16, "train")
    x_test, y_test = data.load_digits(16, "test")
    clf = LogisticRegression(max_iter=2000).fit(to_classifier_grid(x_train.numpy()), y_train.numpy())
    accuracy = clf.score(to_classifier_grid(x_test.numpy()), y_test.numpy())
    print(f"classifier: logistic regression on 1,500 real 8x8 digits, {accuracy:.1%} right on the 297 held out")
    rows = [("real (held out)", to_classifier_grid(x_test.numpy())),
            ("uniform noise", to_classifier_grid(np.random.default_rng(0).integers(0, 256, (297, 16, 16, 1))))]
    for path in args.samples:
        if not os.path.isfile(path):
            print(f"error: {path} does not exist; pass .npz files written by sample.py", file=sys.stderr)
            sys.exit(2)
        with np.load(path) as f:
            rows.append((path, to_classifier_grid(f["x"])))
    print(f"| {'images':<48} | {'n':>5} | confidence | spread | count per digit 0-9 |")
    print(f"|{'-' * 50}|{'-' * 7}|{'-' * 12}|{'-' * 8}|{'-' * 21}|")
    for name, features in rows:
        conf, spread, counts = scores(clf, features)
        print(f"| {name:<48} | {len(features):>5} | {conf:10.3f} | {spread:6.3f} | {' '.join(map(str, counts))} |")


if __name__ == "__main__":
    main()
