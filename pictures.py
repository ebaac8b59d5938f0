"""
The picture sample.py inverts or edits (--invert, --edit, --mask): a picture file, cifar10:N for the N-th
CIFAR-10 test image or digits:N for the N-th held-out handwritten digit, cut to its central square (said in one line,
never squashed) and resized to the network's size.
The file itself is read by data.read_picture, which checks it (missing, too large, corrupt) before decoding.
"""

import os
import re

import data
from cli import UsageError, say


# the test images a user names as NAME:N, each read by data.py: (its N-th test image, label)
TEST_SETS = {"cifar10": ("a CIFAR-10 test image", lambda data_dir: data.load_cifar10(data_dir, split="test")),
             "digits": ("a held-out handwritten digit", lambda data_dir: data.load_digits(16, "test"))}


def open_picture(spec, data_dir=None, flag="--invert", mode="RGB"):
    """A picture file, or NAME:N for the N-th test image of TEST_SETS (cifar10:7, digits:3), as a PIL image in
    `mode`; its label (or None) and a name for files."""
    m = re.fullmatch(r"(cifar10|digits):(\d+)", spec)
    if m:
        import torchvision.transforms.functional as TF  # here: torchvision's import takes seconds, a refusal none
        name, i = m.group(1), int(m.group(2))
        x, y = TEST_SETS[name][1](data_dir)
        if i >= x.shape[0]:
            raise UsageError(f"{flag}: {name}:N takes N in 0..{x.shape[0] - 1} (the test set), got {i}")
        return TF.to_pil_image(x[i]).convert(mode), int(y[i]), f"{name}-{i}"
    for name in TEST_SETS:
        if spec.startswith(name + ":"):
            raise UsageError(f"{flag}: expected {name}:N with N a test-set index, got {spec!r}")
    # the file: data.read_picture checks it (missing, too large, corrupt) and reads it as an 8-bit picture
    kinds = ["a picture file"] + ([f"{name}:N ({what})" for name, (what, _) in TEST_SETS.items()]
                                  if flag != "--mask" else [])
    img = data.read_picture(spec, mode, flag, "pass " + " or ".join([", ".join(kinds[:-1]), kinds[-1]] if
                                                                     len(kinds) > 1 else kinds))
    return img, None, re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(spec))[0])


def fit(img, size, spec, flag="--invert", quiet=False):
    """A non-square picture is cut to its central square (said in one line, never squashed); then it is resized to
    the network's size. Returns uint8 [1, C, size, size]."""
    import torchvision.transforms.functional as TF
    w, h = img.size
    if w != h:
        side = min(w, h)
        if not quiet:
            say(f"note: {flag}: {spec} is {w}x{h}; using its central {side}x{side} square"
                + (f", resized to {size}x{size}" if side != size else ""))
        img = TF.center_crop(img, [side, side])
    elif w != size and not quiet:
        say(f"note: {flag}: {spec} is {w}x{h}; resized to the network's {size}x{size}")
    if img.size[0] != size:
        img = TF.resize(img, [size, size], antialias=True)
    return TF.pil_to_tensor(img)[None]


def read_image(spec, size, channels, data_dir=None, flag="--invert"):
    """The image to invert or edit as floats [1, C, size, size] in [-1, 1], its label (or None), a name for files and
    the picture's own (width, height).

    `spec` is a picture file, cifar10:N (the N-th CIFAR-10 test image) or digits:N. A non-square picture is cut to its
    central square (said in one line, never squashed); then it is resized to the network's size.
    """
    img, label, name = open_picture(spec, data_dir, flag, "L" if channels == 1 else "RGB")
    return data.to_float(fit(img, size, spec, flag)), label, name, img.size


def read_mask(spec, picture_size, size, image_spec):
    """--mask: a picture of the --edit image's own size, as floats [1, 1, size, size] in [0, 1], 1 (white) = keep the
    input, 0 (black) = repaint (edit.py's m, RePaint eq. 10); cropped and resized exactly like the image."""
    img, _, name = open_picture(spec, flag="--mask", mode="L")
    if img.size != picture_size:
        raise UsageError(f"--mask: {spec} is {img.size[0]}x{img.size[1]} but the --edit image {image_spec} is "
                         f"{picture_size[0]}x{picture_size[1]}; draw the mask on a picture of the image's size")
    return fit(img, size, spec, "--mask", quiet=True).float() / 255, name
