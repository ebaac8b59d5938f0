"""Pictures handed to sample.py's --edit, --invert and --mask (data.read_picture).

What is pinned: a picture too large to be worth decoding is refused from its header alone, before a pixel is decoded;
every pixel format reaches the network as the 8-bit picture a viewer shows (16-bit grey scaled, not clipped to white;
alpha over white; palettes, CMYK, 1-bit); a missing file, a folder and a corrupt file each get their own one line.

The command lines run as forked children of the test process (a real process each, with its own exit status, stdout,
stderr and peak memory, running the script as __main__, but without a fresh interpreter's seconds of importing torch);
one case runs from a fresh interpreter.
"""

import os
import runpy
import struct
import subprocess
import sys
import tempfile
import traceback
import zlib

import numpy as np
import pytest
import torchvision.transforms.functional  # noqa: F401 (imported once here, not in every forked child: seconds)
import torchvision.utils  # noqa: F401
from PIL import Image

import data
import sample
from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 2 ** 20


# ----------------------------------------------------------------------------------------------------------------
# Running a script
# ----------------------------------------------------------------------------------------------------------------

def forked(script, argv):
    """`python SCRIPT ARGV` as a forked child: (exit status, stdout, stderr, peak resident memory in bytes)."""
    path = os.path.join(ROOT, script)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:  # the child: runs the script as its __main__ and never returns into pytest
            code = 70
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                sys.argv = [path, *argv]
                runpy.run_path(path, run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status, usage = os.wait4(pid, 0)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read(), err.read(), usage.ru_maxrss * 1024


def fresh(script, argv):
    """`python SCRIPT ARGV` from a fresh interpreter, started now: a Popen (several run at once, see finish)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))


def finish(proc):
    """(exit status, stdout, stderr) of a fresh() process."""
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err, None


def one_line(result, *words, quiet=True):
    """A refusal: exit status 2, ONE line on stderr, no traceback, holding every word; with quiet, nothing on stdout
    either (refused before the script announced any work)."""
    rc, out, err, _ = result
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (rc, err)
    assert out == "" or not quiet, out
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# Writing pictures
# ----------------------------------------------------------------------------------------------------------------

def png_chunk(kind, payload):
    """One PNG chunk: length, type, payload, CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png(path, width, height, bits=8, colour=0, pixels=b""):
    """A PNG written by hand: `pixels` are the filtered rows as the IDAT chunk compresses them. With no pixels the
    file is a header that claims width x height and holds no image: decoding it fails, reading its size does not."""
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0))
                + png_chunk(b"IDAT", zlib.compress(pixels)) + png_chunk(b"IEND", b""))
    return str(path)


def png16(path, values):
    """A 16-bit PNG of unsigned values [H, W] (grey) or [H, W, 3] (RGB): every row gets filter byte 0."""
    h, w = values.shape[:2]
    rows = values.astype(">u2").reshape(h, -1)
    pixels = b"".join(b"\0" + row.tobytes() for row in rows)
    return png(path, w, h, 16, 0 if values.ndim == 2 else 2, pixels)


def saved(path, image, **kwargs):
    """A PIL image written to path (the format from its extension)."""
    image.save(path, **kwargs)
    return str(path)


def over_white(colour, alpha):
    """What a viewer shows on a white page: colour composited over white, rounded to 8 bits."""
    colour, alpha = colour.astype(np.float64), alpha.astype(np.float64)[..., None]
    return np.round((colour * alpha + 255 * (255 - alpha)) / 255).astype(np.uint8)


def as_rgb(grey):
    """A grey picture [H, W] as the RGB network sees it: the grey level in all three channels."""
    return np.repeat(grey[..., None], 3, axis=-1)


RNG = np.random.default_rng(0)
U16 = RNG.integers(0, 65536, (8, 8)).astype(np.uint16)
U16[0, :4] = (0, 65535, 257, 128)  # black, white, 1/255 exactly, just under half a step (rounds to 0)
U8 = RNG.integers(0, 256, (8, 8, 4)).astype(np.uint8)


def pictures(folder):
    """name -> (a picture file of every pixel format PIL reads, the uint8 RGB [8, 8, 3] the network must see)."""
    f = lambda name: os.path.join(folder, name)  # noqa: E731
    rgb, alpha, grey = U8[..., :3], U8[..., 3], U8[..., 0]
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    index = U8[..., 1]
    bits = U8[..., 2] > 127
    cmyk = U8
    pal = Image.fromarray(index).convert("P")  # the grey levels become the palette indices
    pal.putpalette(palette.tobytes())
    clear = [255] * 256
    clear[index[0, 0]] = 0  # one palette entry fully transparent
    sixteen = U16.astype(np.int64) * 255 / 65535  # the 16-bit value scaled to 8 bits, before rounding
    return {
        # 16-bit grey: PNG (mode I;16), big-endian TIFF (I;16B), 16-bit PGM (mode I): v -> round(v * 255 / 65535)
        "grey16.png": (png16(f("grey16.png"), U16), as_rgb(np.round(sixteen).astype(np.uint8))),
        "grey16b.tif": (saved(f("grey16b.tif"), Image.fromarray(U16.astype(">u2"))),
                        as_rgb(np.round(sixteen).astype(np.uint8))),
        "grey16.pgm": (f("grey16.pgm"), as_rgb(np.round(sixteen).astype(np.uint8))),
        # 16-bit RGB: PIL keeps the high byte (v // 256), within 1 of the rounded value
        "rgb16.png": (png16(f("rgb16.png"), np.stack([U16, U16.T, U16[::-1]], -1)),
                      (np.stack([U16, U16.T, U16[::-1]], -1) // 256).astype(np.uint8)),
        "grey.png": (saved(f("grey.png"), Image.fromarray(grey)), as_rgb(grey)),
        "rgb.png": (saved(f("rgb.png"), Image.fromarray(rgb)), rgb),
        "bits.png": (saved(f("bits.png"), Image.fromarray(bits)), as_rgb(bits.astype(np.uint8) * 255)),
        "palette.png": (saved(f("palette.png"), pal), palette[index]),
        "palette-clear.png": (saved(f("palette-clear.png"), pal, transparency=bytes(clear)),
                              over_white(palette[index], np.where(index == index[0, 0], 0, 255))),
        "rgba.png": (saved(f("rgba.png"), Image.fromarray(U8)), over_white(rgb, alpha)),
        "la.png": (saved(f("la.png"), Image.fromarray(np.stack([grey, alpha], -1))),
                   as_rgb(over_white(grey[..., None], alpha)[..., 0])),
        # CMYK: each channel (255 - c)(255 - k) / 255
        "cmyk.tif": (saved(f("cmyk.tif"), Image.frombytes("CMYK", (8, 8), cmyk.tobytes())),
                     np.round((255 - cmyk[..., :3].astype(np.float64)) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8)),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every picture format, and a tiny run (8x8 RGB images) to edit them with."""
    root = tmp_path_factory.mktemp("inputs")
    with open(root / "grey16.pgm", "wb") as f:
        f.write(b"P5 8 8 65535\n" + U16.astype(">u2").tobytes())
    return {"root": root, "run": tiny.write(str(root / "run")), "pictures": pictures(str(root))}


def edit_input(files, picture, tmp_path, flag="--edit"):
    """The picture the network was given, as sample.py --edit ... --strength 0 saves it (the .npz's `input`)."""
    out = str(tmp_path / "edit")
    argv = ["--checkpoint", files["run"], "--edit", picture, "--strength", "0", "--n", "1", "--out", out,
            "--no-progress", "--device", "cpu"]
    if flag == "--mask":
        argv[3:4] = [files["pictures"]["rgb.png"][0], "--mask", picture]
    result = forked("sample.py", argv)
    assert result[0] == 0, result[2]
    return np.load(out + ".npz")


# ----------------------------------------------------------------------------------------------------------------
# Pictures: every pixel format, as a viewer shows it
# ----------------------------------------------------------------------------------------------------------------

NAMES = ["grey16.png", "grey16b.tif", "grey16.pgm", "rgb16.png", "grey.png", "rgb.png", "bits.png", "palette.png",
         "palette-clear.png", "rgba.png", "la.png", "cmyk.tif"]


@pytest.mark.parametrize("name", NAMES)
def test_read_picture_gives_the_8_bit_picture_a_viewer_shows(files, name):
    path, expected = files["pictures"][name]
    got = np.asarray(data.read_picture(path, "RGB", "--edit"))
    assert got.dtype == np.uint8 and got.shape == (8, 8, 3)
    tolerance = 1 if name == "rgb16.png" else 0  # PIL's high byte against the rounded value
    assert np.abs(got.astype(int) - expected).max() <= tolerance, name
    # "L" (a mask, a grey network) is the same picture's luminance (ITU-R 601, PIL's), not a clipped channel
    luma = np.asarray(data.read_picture(path, "L", "--mask")).astype(int)
    assert np.abs(luma - np.asarray(Image.fromarray(expected).convert("L"))).max() <= tolerance


@pytest.mark.parametrize("name", ["grey16.png", "grey.png", "bits.png", "palette.png", "palette-clear.png",
                                  "rgba.png", "la.png", "cmyk.tif"])
def test_sample_edit_gives_the_network_that_picture(files, name, tmp_path):
    # a real process per format (the 16-bit and alpha ones reached the network white, or black, before)
    path, expected = files["pictures"][name]
    assert np.array_equal(edit_input(files, path, tmp_path)["input"][0], expected), name


def test_sample_mask_reads_the_same_way(files, tmp_path):
    # a transparent part of a mask shows white over a white page: white keeps the input
    path, expected = files["pictures"]["rgba.png"]
    got = edit_input(files, path, tmp_path, flag="--mask")["mask"][0, :, :, 0]
    assert np.array_equal(got, np.asarray(Image.fromarray(expected).convert("L")))
    # a 16-bit mask: 65535 keeps, 0 repaints, 32768 blends half and half (was: everything above 255 kept)
    path, expected = files["pictures"]["grey16.png"]
    mask, _ = sample.read_mask(path, (8, 8), 8, "picture.png")
    assert np.array_equal((mask[0, 0] * 255).round().numpy().astype(np.uint8), expected[..., 0])


def test_pixels_without_an_8_bit_meaning_are_refused(files, tmp_path):
    # floats (whose range no file states), and 32-bit integers beyond 16 bits, cannot be read as a picture
    f32 = saved(tmp_path / "f32.tif", Image.fromarray(np.full((8, 8), 0.5, np.float32)))
    one_line(forked("sample.py", ["--checkpoint", files["run"], "--edit", f32]), "--edit", f32, "floating-point")
    i32 = saved(tmp_path / "i32.tif", Image.fromarray(np.full((8, 8), 70000, np.int32)))
    with pytest.raises(data.DataError, match="--edit: .*i32.tif has 32-bit integer pixels .*16 bits"):
        data.read_picture(i32, "RGB", "--edit")


# ----------------------------------------------------------------------------------------------------------------
# Pictures: too large, missing, not a picture
# ----------------------------------------------------------------------------------------------------------------

def test_a_huge_picture_is_refused_in_a_fresh_interpreter(files, tmp_path):
    # 20000 x 20000: PIL's own guard raised DecompressionBombError (a traceback)
    huge_png = png(tmp_path / "huge.png", 20000, 20000)
    sampling = fresh("sample.py", ["--checkpoint", files["run"], "--edit", huge_png, "--device", "cpu", "--out",
                                   str(tmp_path / "e")])
    line = one_line(finish(sampling), "--edit", huge_png, "20000x20000 (400.0 megapixels)", "4096x4096")
    assert not (tmp_path / "e.png").exists() and not (tmp_path / "e.npz").exists(), line


def test_a_picture_over_the_limit_is_refused_from_its_header(files, tmp_path):
    # 4097 x 4097 is over 4096 x 4096 and under PIL's own guard: decoding would have been tried (and failed: the file
    # holds no pixels); the header alone says it is too large, for each flag that reads a picture
    big = png(tmp_path / "big.png", 4097, 4097)
    one_line(forked("sample.py", ["--checkpoint", files["run"], "--edit", big]), "--edit", "4097x4097", "4096x4096")
    for flag in ("--invert", "--mask"):
        with pytest.raises(data.DataError, match=f"{flag}: .* is 4097x4097 .*4096x4096"):
            sample.open_picture(big, flag=flag)


def test_the_size_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    def decode(self):
        raise AssertionError("a pixel was decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    for w, h in ((4097, 4097), (20000, 20000), (2 ** 24 + 1, 1)):
        with pytest.raises(data.DataError, match=f"--edit: .* is {w}x{h} .*4096x4096"):
            data.read_picture(png(tmp_path / "big.png", w, h), "RGB", "--edit")
    monkeypatch.undo()
    # at the limit the size passes, and decoding this pixel-less file is what fails
    with pytest.raises(data.DataError, match="cannot read"):
        data.read_picture(png(tmp_path / "limit.png", 4096, 4096), "RGB", "--edit")


def bad_files(folder):
    """name -> (path, words the one line must hold): the ways a picture file can be wrong."""
    truncated = os.path.join(folder, "truncated.png")
    Image.fromarray(U8[..., :3]).save(truncated)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) - 40)  # the IDAT cut short
    with open(os.path.join(folder, "junk.png"), "wb") as f:
        f.write(b"this is not a picture" * 10)
    open(os.path.join(folder, "empty.png"), "wb").close()
    os.makedirs(os.path.join(folder, "folder.png"), exist_ok=True)
    return {"missing": (os.path.join(folder, "missing.png"), ["does not exist"]),
            "folder": (os.path.join(folder, "folder.png"), ["is a directory"]),
            "junk": (os.path.join(folder, "junk.png"), ["cannot read", "not a picture"]),
            "empty": (os.path.join(folder, "empty.png"), ["cannot read", "empty"]),
            "truncated": (truncated, ["cannot read", "truncated"])}


@pytest.mark.parametrize("case", ["missing", "folder", "junk"])
def test_a_file_that_is_no_picture_says_what_is_wrong(files, tmp_path, case):
    # a real process for each kind: missing (was "cannot read an image"), a folder, not a picture
    path, words = bad_files(str(tmp_path))[case]
    one_line(forked("sample.py", ["--checkpoint", files["run"], "--edit", path]), "--edit", path, *words)


@pytest.mark.parametrize("flag", ["--edit", "--invert", "--mask"])
def test_every_flag_says_what_is_wrong_with_its_file(tmp_path, flag):
    for path, words in bad_files(str(tmp_path)).values():
        with pytest.raises(data.DataError) as e:
            sample.open_picture(path, flag=flag, mode="L" if flag == "--mask" else "RGB")
        line = str(e.value)
        assert line.startswith(f"{flag}: ") and "\n" not in line and all(w in line for w in words), line
        assert ("cifar10:N" in line) == (flag != "--mask"), line  # the other choice, where there is one
