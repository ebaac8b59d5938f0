"""Files handed to the scripts: the pictures of sample.py's --edit, --invert and --mask (data.read_picture), and the
.npz files of evaluate.py's `fid --samples` and `--ref` (data.npz_headers, data.read_npz).

What is pinned: a picture too large to be worth decoding is refused from its header alone, before a pixel is decoded;
every pixel format reaches the network as the 8-bit picture a viewer shows (16-bit grey scaled, not clipped to white;
alpha over white; palettes, CMYK, 1-bit); a missing file, a folder and a corrupt file each get their own one line. An
.npz array is checked from its .npy header (shape, dtype, size against the machine's memory) before its data is read,
and only the arrays needed are read; reference statistics and samples of the wrong kind are one line each, before the
Inception network is loaded, and nothing is appended to results.jsonl.

The command lines run as forked children of the test process (a real process each, with its own exit status, stdout,
stderr and peak memory, running the script as __main__, but without a fresh interpreter's seconds of importing torch);
one case per script runs from a fresh interpreter.
"""

import functools
import io
import os
import runpy
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import traceback
import zlib

import numpy as np
import numpy.lib.format as npy
import pytest
import torchvision.transforms.functional  # noqa: F401 (imported once here, not in every forked child: seconds)
import torchvision.utils  # noqa: F401
from PIL import Image

import data
import evaluate
import fid
import sample
from pictures import open_picture
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
    """name -> (a picture file in each pixel format tested, the uint8 RGB [8, 8, 3] the network must see)."""
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

def test_fresh_interpreters_refuse_a_huge_picture_and_a_huge_array(files, tmp_path):
    # one case per script from a fresh interpreter, both at once: a 20000 x 20000 picture (PIL's own guard raised
    # DecompressionBombError: a traceback) and an .npz header claiming 10^11 images (numpy raised MemoryError)
    huge_png = png(tmp_path / "huge.png", 20000, 20000)
    huge_npz = forged(tmp_path / "huge.npz", "x", (10 ** 11, 32, 32, 3), np.uint8)
    sampling = fresh("sample.py", ["--checkpoint", files["run"], "--edit", huge_png, "--device", "cpu", "--out",
                                   str(tmp_path / "e")])
    scoring = fresh("evaluate.py", ["fid", "--samples", huge_npz, "--out", str(tmp_path / "r.jsonl")])
    line = one_line(finish(sampling), "--edit", huge_png, "20000x20000 (400.0 megapixels)", "4096x4096")
    assert not (tmp_path / "e.png").exists() and not (tmp_path / "e.npz").exists(), line
    line = one_line(finish(scoring), "--samples", huge_npz, "[100000000000, 32, 32, 3] (279.4 TB)", "memory")
    assert not (tmp_path / "r.jsonl").exists(), line


def test_a_picture_over_the_limit_is_refused_from_its_header(files, tmp_path):
    # 4097 x 4097 is over 4096 x 4096 and under PIL's own guard: decoding would have been tried (and failed: the file
    # holds no pixels); the header alone says it is too large, for each flag that reads a picture
    big = png(tmp_path / "big.png", 4097, 4097)
    one_line(forked("sample.py", ["--checkpoint", files["run"], "--edit", big]), "--edit", "4097x4097", "4096x4096")
    for flag in ("--invert", "--mask"):
        with pytest.raises(data.DataError, match=f"{flag}: .* is 4097x4097 .*4096x4096"):
            open_picture(big, flag=flag)


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
            open_picture(path, flag=flag, mode="L" if flag == "--mask" else "RGB")
        line = str(e.value)
        assert line.startswith(f"{flag}: ") and "\n" not in line and all(w in line for w in words), line
        assert ("cifar10:N" in line) == (flag != "--mask"), line  # the other choice, where there is one


# ----------------------------------------------------------------------------------------------------------------
# Writing .npz files
# ----------------------------------------------------------------------------------------------------------------

def npy_header(shape, dtype):
    """The .npy header of an array of `shape` and `dtype` (what precedes its data)."""
    f = io.BytesIO()
    npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                                   "shape": tuple(shape)})
    return f.getvalue()


def zip_member(name, payload, zeros=0):
    """A zip member: `payload` followed by `zeros` zero bytes (a multiple of 1 MB). Without zeros it is stored as is
    (np.savez's way: nothing to compress); with them it is deflated, and the compressed megabyte of zeros is built
    once and repeated (each ends in a full flush, so each is the same bytes): a 200 MB member costs milliseconds.
    Returns (name, crc, the bytes stored, uncompressed size, zip method: 0 stored, 8 deflated)."""
    if not zeros:
        return name.encode(), zlib.crc32(payload), payload, len(payload), 0
    c = zlib.compressobj(1, zlib.DEFLATED, -15)
    head = c.compress(payload) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(MB)) + c.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(payload)
    for _ in range(zeros // MB):
        crc = zlib.crc32(bytes(MB), crc)
    return name.encode(), crc, head + block * (zeros // MB) + c.flush(), len(payload) + zeros, 8


def write_zip(path, members):
    """A zip file of members from zip_member: local headers and data, the central directory, its end record."""
    central = b""
    with open(path, "wb") as f:
        for name, crc, packed, size, method in members:
            central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, len(packed), size,
                                   len(name), 0, 0, 0, 0, 0, f.tell()) + name
            f.write(struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(packed), size, len(name),
                                0) + name)
            f.write(packed)
        start = f.tell()
        f.write(central + struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central),
                                      start, 0))
    return str(path)


def array_member(key, a):
    """The zip member `key`.npy of array a, as np.savez stores it."""
    f = io.BytesIO()
    np.save(f, a, allow_pickle=True)
    return zip_member(key + ".npy", f.getvalue())


@functools.lru_cache(maxsize=None)
def identity():
    """I [2048, 2048] float64: a valid sigma."""
    return np.eye(2048)


@functools.lru_cache(maxsize=None)
def identity_member():
    """sigma = I [2048, 2048] as a zip member, built once: 32 MB that most reference files of these tests share."""
    return array_member("sigma", identity())


def npz(path, zeros=0, **arrays):
    """An .npz of `arrays` (arrays, or members from array_member), plus, with zeros=N, a member `unused` of N zero
    bytes (uint8 [N])."""
    members = [a if isinstance(a, tuple) else array_member(key, a) for key, a in arrays.items()]
    if zeros:
        members.append(unused_member(zeros))
    return write_zip(path, members)


@functools.lru_cache(maxsize=None)
def unused_member(zeros):
    """The member `unused`: uint8 [zeros] of zeros, deflated (built once: its CRC reads every byte)."""
    return zip_member("unused.npy", npy_header((zeros,), np.uint8), zeros)


def header_only(key, a):
    """A member `key`.npy with the header of array a and none of its data: a file that can only be refused from its
    headers (reading the array would fail: it holds 0 bytes)."""
    return zip_member(key + ".npy", npy_header(a.shape, a.dtype))


def forged(path, key, shape, dtype, holds=64):
    """An .npz whose array `key` claims `shape` and `dtype` in its header but holds only `holds` bytes of data."""
    return write_zip(path, [zip_member(key + ".npy", npy_header(shape, dtype) + bytes(holds))])


def pixels(n=4, size=8):
    return RNG.integers(0, 256, (n, size, size, 3)).astype(np.uint8)


@pytest.fixture
def scored(monkeypatch, capsys):
    """scored(argv): evaluate.py's command line in-process, and its one line of refusal. The Inception network is the
    first work of `fid`: loading it fails the test, so every refusal is proved to come before any work."""
    def work(*args, **kwargs):
        raise AssertionError("the Inception network was loaded before the input was checked")
    monkeypatch.setattr(fid, "load_inception", work)

    def scored(argv):
        assert tiny.run(evaluate, argv) == 2
        return tiny.one_line_error(capsys)
    return scored


# ----------------------------------------------------------------------------------------------------------------
# .npz: headers checked before the data is read
# ----------------------------------------------------------------------------------------------------------------

HEADERS = {  # a header larger than the machine's memory, and one larger than the data the file holds
    "memory": ((10 ** 11, 8, 8, 3), ["(17.5 TB), more than this machine's memory"]),
    "holds": ((1000, 8, 8, 3), ["(187.5 kB) but holds only 64 bytes"]),
}


def header_argv(tmp_path, flag, case):
    """fid's command line with a forged header in the --samples or the --ref file; (argv, the forged file, words)."""
    shape, words = HEADERS[case]
    bad = forged(tmp_path / "x.npz", "x", shape, np.uint8)
    good = npz(tmp_path / "good.npz", x=pixels())
    files = [bad, good] if flag == "--samples" else [good, bad]
    return ["fid", "--samples", files[0], "--ref", files[1], "--out", ""], bad, [str(list(shape))] + words


@pytest.mark.parametrize("flag,case", [("--samples", "memory"), ("--ref", "holds")])
def test_array_headers_are_checked_before_the_data_is_read(tmp_path, flag, case):
    argv, bad, words = header_argv(tmp_path, flag, case)
    one_line(forked("evaluate.py", argv), flag, bad, *words)


@pytest.mark.parametrize("flag,case", [("--samples", "holds"), ("--ref", "memory")])
def test_array_headers_in_process(tmp_path, scored, flag, case):
    argv, bad, words = header_argv(tmp_path, flag, case)
    line = scored(argv)
    assert line.startswith(f"error: {flag}: {bad}") and all(w in line for w in words), line


def test_read_npz_checks_every_array_it_reads(tmp_path, monkeypatch):
    # CIFAR-10 shards (train.py --data-dir) go through the same reader
    y = io.BytesIO()
    np.save(y, np.zeros(10, np.int64))
    bad = write_zip(tmp_path / "train_0.npz", [zip_member("x.npy", npy_header((10 ** 9, 32, 32, 3), np.uint8)),
                                                zip_member("y.npy", y.getvalue())])
    claim = r"--data-dir: .* array x claims uint8 \[1000000000, 32, 32, 3\] .*memory"
    with pytest.raises(data.DataError, match=claim):
        data.load_cifar10(str(bad))
    # the limit is the machine's memory: a smaller machine refuses a smaller array
    monkeypatch.setattr(data, "memory_bytes", lambda: 1000)
    with pytest.raises(data.DataError, match=r"1\.5 kB.*1000 bytes"):
        data.read_npz(npz(tmp_path / "s.npz", x=pixels(8)), "--samples", keys=("x",))
    # pickled objects are never read
    with pytest.raises(data.DataError, match="--samples: .*Python objects"):
        data.read_npz(npz(tmp_path / "o.npz", x=np.array([{}], dtype=object)), "--samples")


def peak_of(call):
    """(result, the peak of the memory numpy and Python allocated during call(), in bytes)."""
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_only_the_arrays_needed_are_read(tmp_path):
    # a 200 MB member beside the images (or the statistics) is never decompressed: memory stays at the arrays' size
    x = pixels()
    samples = npz(tmp_path / "s.npz", zeros=200 * MB, x=x, y=np.zeros(4, np.int64))
    got, peak = peak_of(lambda: fid.load_samples(samples))
    assert np.array_equal(got, x) and peak < 4 * MB
    stats = npz(tmp_path / "r.npz", zeros=200 * MB, mu=np.zeros(2048), sigma=np.eye(2048), image_size=np.array(8))
    (mu, sigma), peak = peak_of(lambda: fid.reference_stats(stats))
    assert mu.shape == (2048,) and np.array_equal(sigma, np.eye(2048)) and peak < 3 * sigma.nbytes
    assert peak_of(lambda: fid.reference_image_size(stats))[1] < 3 * sigma.nbytes


def test_a_big_unused_member_is_not_read_by_the_script(tmp_path):
    # evaluate.py in a real process: its peak memory with a 200 MB unused member is that without it. (The samples are
    # 8x8 and the reference CIFAR-10's 32x32: refused once the samples are read, before any Inception work.)
    x = pixels()
    runs = {}
    for name, zeros in (("plain", 0), ("unused", 200 * MB)):
        path = npz(tmp_path / f"{name}.npz", zeros=zeros, x=x)
        runs[name] = forked("evaluate.py", ["fid", "--samples", path, "--out", ""])
        one_line(runs[name], "--ref", "8x8")
    assert runs["unused"][3] - runs["plain"][3] < 64 * MB, (runs["unused"][3] - runs["plain"][3]) / MB


# ----------------------------------------------------------------------------------------------------------------
# .npz: what evaluate.py reads must be what it expects
# ----------------------------------------------------------------------------------------------------------------

def stats(**changes):
    """Reference statistics of 8x8 images (mu 0, sigma I), with entries replaced (None removes one)."""
    arrays = {"mu": np.zeros(2048), "sigma": identity_member(), "image_size": np.array(8)}
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def asymmetric():
    s = np.eye(2048)
    s[0, 1] = 0.5
    return s


BAD_REFS = {  # name -> (the arrays of the --ref file, made when used; words the one line must hold)
    # refused from the headers: the wrong or a missing array, strings, complex numbers, other shapes
    "no-sigma": (lambda: stats(sigma=None), ["has mu", "but no sigma"]),
    "no-mu": (lambda: stats(mu=None), ["no mu"]),
    "string-mu": (lambda: stats(mu=np.array(["0.0"] * 2048)), ["mu <U3 [2048], expected float [2048]"]),
    "complex-mu": (lambda: stats(mu=np.zeros(2048) + 1j), ["mu complex128 [2048], expected float [2048]"]),
    "int-sigma": (lambda: stats(sigma=np.eye(2048, dtype=np.int64)), ["sigma int64 [2048, 2048]"]),
    "short-mu": (lambda: stats(mu=np.zeros(64)), ["mu float64 [64]"]),
    "flat-sigma": (lambda: stats(sigma=np.zeros(2048 * 2048)), ["sigma float64 [4194304]"]),
    "image-size-3": (lambda: stats(image_size=np.array([8, 8, 3])), ["image_size int64 [3]"]),
    "image-size-string": (lambda: stats(image_size=np.array("8")), ["image_size <U1 []"]),
    "image-size-float": (lambda: stats(image_size=np.array(8.0)), ["image_size float64 []"]),
    "nothing": (lambda: {"foo": np.zeros(3)}, ["['foo']"]),
    "images-float": (lambda: {"x": pixels().astype(np.float32)}, ["x float32 [4, 8, 8, 3]"]),
    # refused once read: the values
    "nan-mu": (lambda: stats(mu=np.full(2048, np.nan)), ["non-finite"]),
    "inf-sigma": (lambda: stats(sigma=np.where(np.eye(2048) > 0, np.inf, 0)), ["non-finite"]),
    "asymmetric-sigma": (lambda: stats(sigma=asymmetric()), ["not symmetric"]),
    "negative-variance": (lambda: stats(sigma=-np.eye(2048)), ["negative variance"]),
    "image-size-negative": (lambda: stats(image_size=np.array(-8)), ["image_size -8"]),
    "image-size-zero": (lambda: stats(image_size=np.array([8, 0])), ["image_size [8, 0]"]),
}
FROM_HEADERS = list(BAD_REFS)[:12]


def bad_ref(tmp_path, case, headers_only=False):
    """(fid's command line scoring good samples against the BAD_REFS case, the --ref file, --out, words). With
    headers_only, every array of the --ref file is a header without data (header_only)."""
    arrays, words = BAD_REFS[case]
    arrays = arrays()
    if headers_only:
        arrays = {k: header_only(k, identity() if isinstance(a, tuple) else a) for k, a in arrays.items()}
    ref = npz(tmp_path / "ref.npz", **arrays)
    out = tmp_path / "results.jsonl"
    out.write_text('{"metric": "earlier"}\n')
    argv = ["fid", "--samples", npz(tmp_path / "s.npz", x=pixels()), "--ref", ref, "--out", str(out), "--device",
            "cpu"]
    return argv, ref, out, words


@pytest.mark.parametrize("case", sorted(BAD_REFS))
def test_bad_reference_statistics_are_one_line_and_nothing_is_appended(tmp_path, scored, case):
    # the header-level cases have no data at all: refused from the headers, before anything is read
    argv, ref, out, words = bad_ref(tmp_path, case, headers_only=case in FROM_HEADERS)
    line = scored(argv)
    assert line.startswith(f"error: --ref: {ref}") and all(w in line for w in words), line
    assert out.read_text() == '{"metric": "earlier"}\n'


@pytest.mark.parametrize("case", ["no-sigma", "complex-mu", "asymmetric-sigma", "image-size-3"])
def test_bad_reference_statistics_in_a_real_process(tmp_path, case):
    # one of each kind (missing, the wrong type, the wrong values, a malformed image_size), whole files: complex mu
    # scored "FID 2480", exit 0, appended. A missing --inception would be the next error: the reference comes first.
    argv, ref, out, words = bad_ref(tmp_path, case)
    one_line(forked("evaluate.py", argv + ["--inception", str(tmp_path / "missing.pt")]), "--ref", ref, *words)
    assert out.read_text() == '{"metric": "earlier"}\n'


def test_good_reference_statistics_pass_the_checks(tmp_path, monkeypatch, capsys):
    # the control of the tests above: sound statistics (float64, or float32 with image_size [H, W]) pass every check
    # and reach the next step, loading the Inception network (here: a missing file, refused)
    samples = npz(tmp_path / "s.npz", x=pixels())
    argv = ["fid", "--samples", samples, "--ref", npz(tmp_path / "ref.npz", **stats()), "--inception",
            str(tmp_path / "missing.pt"), "--out", ""]
    one_line(forked("evaluate.py", argv), "--inception", quiet=False)  # after "loading the FID Inception network"
    ref = npz(tmp_path / "ref32.npz", **stats(mu=np.zeros(2048, np.float32), sigma=np.eye(2048, dtype=np.float32),
                                              image_size=np.array([8, 8], np.int32)))
    assert fid.reference_image_size(ref) == (8, 8)
    assert tiny.run(evaluate, argv[:4] + [ref] + argv[5:]) == 2
    assert "--inception" in tiny.one_line_error(capsys)


BAD_SAMPLES = {  # name -> (the arrays of the --samples file, words the one line must hold)
    "none": ({"x": pixels(0)}, ["x uint8 [0, 8, 8, 3]", "N >= 2"]),
    "one": ({"x": pixels(1)}, ["x uint8 [1, 8, 8, 3]"]),
    "float": ({"x": pixels().astype(np.float32) / 255}, ["x float32 [4, 8, 8, 3]"]),
    "rgba": ({"x": RNG.integers(0, 256, (4, 8, 8, 4)).astype(np.uint8)}, ["x uint8 [4, 8, 8, 4]"]),
    "three-dims": ({"x": pixels()[..., 0]}, ["x uint8 [4, 8, 8]"]),
    "no-pixels": ({"x": np.zeros((4, 0, 0, 3), np.uint8)}, ["x uint8 [4, 0, 0, 3]"]),
    "strings": ({"arr_0": np.array(["a"] * 4)}, ["arr_0 <U1 [4]"]),
    "other-name": ({"images": pixels()}, ["['images']"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_samples_are_one_line(tmp_path, scored, case):
    arrays, words = BAD_SAMPLES[case]
    samples = npz(tmp_path / "s.npz", **arrays)
    line = scored(["fid", "--samples", samples, "--out", ""])
    assert line.startswith(f"error: --samples: {samples}") and all(w in line for w in words), line


def test_bad_samples_in_a_real_process(tmp_path):
    samples = npz(tmp_path / "s.npz", x=pixels(0))
    one_line(forked("evaluate.py", ["fid", "--samples", samples, "--out", ""]), "--samples", samples, "[0, 8, 8, 3]")
