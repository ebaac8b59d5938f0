"""Tests for `evaluate.py table` (FID over a grid of samplers x steps, DDIM Table 1's layout) and for the sharding of
large sample counts across torchrun ranks (sampling.Sampler.generate, sample.py, evaluate.py).

Tiny and fast: the tiny 8x8 checkpoint of tests/tiny.py, a few images per cell, and, as in tests/test_evaluate.py, the
expensive parts of FID replaced by cheap stand-ins (the Inception network by a fixed function of the pixels, the
2048x2048 matrix square root by ||mu1 - mu2||^2): the plumbing, the grid and the layout are what is tested here."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import fid  # noqa: E402
from benchmarks import fid_table  # noqa: E402
import sample  # noqa: E402
import sampling  # noqa: E402
from ddim import ddim_sample_loop  # noqa: E402
from tests import tiny  # noqa: E402


run, one_line_error = tiny.run, tiny.one_line_error


def fake_features(images, net=None, batch_size=200, **kwargs):
    """A stand-in for the Inception features: a fixed, image-dependent [N, 2048] function of the pixels."""
    x = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
    return np.resize(x, (len(images), 2048)) if x.shape[1] < 2048 else x[:, :2048]


@pytest.fixture()
def cheap_fid(monkeypatch):
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: "the FID network")
    monkeypatch.setattr(fid, "inception_features", fake_features)
    monkeypatch.setattr(fid, "frechet_distance", lambda mu1, s1, mu2, s2: float(np.sum((mu1 - mu2) ** 2)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny.write(str(tmp_path_factory.mktemp("tablerun") / "tiny"))


@pytest.fixture()
def ref8(tmp_path):
    np.savez(tmp_path / "ref8.npz", mu=np.zeros(2048), sigma=np.eye(2048), image_size=np.array(8))
    return str(tmp_path / "ref8.npz")


def table_lines(text):
    return [line for line in text.splitlines() if line.startswith("|")]


def cells(line):
    return [c.strip() for c in line.strip("|").split("|")]


# ----------------------------------------------------------------------------- the table

def test_table_is_ddim_table1_layout_and_each_cell_is_the_fid_command(tiny_run, ref8, tmp_path, capsys, cheap_fid,
                                                                       monkeypatch):
    out, table = tmp_path / "r.jsonl", tmp_path / "table.md"
    common = ["--n", "2", "--sample-batch-size", "2", "--ref", ref8, "--device", "cpu", "--no-progress"]
    assert run(fid_table, ["--checkpoint", tiny_run, "--steps", "10,2", "--out", str(out)] + common) == 0
    printed = capsys.readouterr().out
    rows = table_lines(printed)
    # DDIM Table 1: columns S, rows eta = 0.0, 0.2, 0.5, 1.0 and sigma-hat (ddpm with sigma_t^2 = beta_t)
    assert cells(rows[0]) == ["sampler", "eta", "S = 10", "S = 2"]
    assert [cells(r)[:2] for r in rows[2:]] == [["ddim", "0.0"], ["ddim", "0.2"], ["ddim", "0.5"], ["ddim", "1.0"],
                                                ["ddpm", "sigma-hat"]]
    # the paper's numbers, beside ours where EQUATIONS.md quotes them, and nowhere else
    assert cells(rows[2])[2].endswith("(13.36)")  # eta = 0, S = 10
    assert "(" not in "".join(cells(rows[2])[3:] + [c for r in rows[3:] for c in cells(r)[2:]])  # none else quoted
    assert table.read_text() in printed  # table.md is the printed table, beside --out
    # one line per cell in --out, each saying exactly which sampler it scored
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["settings"] for r in records] == ["ddim10", "ddim2", "ddim10_eta0.2", "ddim2_eta0.2", "ddim10_eta0.5",
                                                "ddim2_eta0.5", "ddim10_eta1", "ddim2_eta1", "ddpm10_varlarge",
                                                "ddpm2_varlarge"]
    assert all(r["n"] == 2 and r["checkpoint_step"] == 10 and r["nfe"] == r["steps"] for r in records)
    assert len({r["value"] for r in records}) == 10  # ten different samplers, ten different values
    for r, row in zip(records[::2], rows[2:]):  # the printed cell is the line's value
        assert cells(row)[2].split(" ")[0] == f"{r['value']:.2f}"
    # a cell is `evaluate.py fid --checkpoint` with the same flags: the same images, the same value
    single = tmp_path / "single.jsonl"
    assert run(evaluate, ["fid", "--checkpoint", tiny_run, "--eta", "0.5", "--steps", "2", "--out", str(single)]
               + common) == 0
    assert json.loads(single.read_text())["value"] == records[5]["value"]
    # resumed: every cell is in --out already, so nothing is drawn again and the table is the same
    capsys.readouterr()
    monkeypatch.setattr(sampling.Sampler, "generate", lambda *a, **k: pytest.fail("a finished cell was drawn again"))
    assert run(fid_table, ["--checkpoint", tiny_run, "--steps", "10,2", "--out", str(out)] + common) == 0
    assert table_lines(capsys.readouterr().out) == rows and len(out.read_text().splitlines()) == 10


def test_table_of_other_samplers_is_one_row_each_with_the_solver_anchor(tiny_run, ref8, tmp_path, capsys, cheap_fid,
                                                                         monkeypatch):
    # DDIM against the ODE solvers; DDIM's loop stands in for heun's here (one network call a step: cheaper)
    monkeypatch.setitem(sampling.SAMPLERS, "heun", sampling.Entry(ddim_sample_loop, ("eta", "clip"),
                                                                        steps=18, skip="karras"))
    out = tmp_path / "r.jsonl"
    assert run(fid_table, ["--checkpoint", tiny_run, "--samplers", "ddim,heun", "--steps", "3", "--n", "2",
                          "--ref", ref8, "--device", "cpu", "--no-progress", "--out", str(out),
                          "--table", str(tmp_path / "t.md")]) == 0
    printed = capsys.readouterr().out
    rows = table_lines(printed)
    assert [cells(r)[:2] for r in rows[2:]] == [["ddim", "0.0"], ["heun", "0.0"]]  # eta 0 only, off the default grid
    assert fid_table.SOLVER_ANCHOR in printed and "4.70 at 10 NFE and 2.87 at 20 NFE" in printed
    assert (tmp_path / "t.md").is_file() and len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize("argv,flag", [
    (["--steps", "0"], "--steps"),
    (["--steps", "10,ten"], "--steps"),
    (["--steps", "101"], "--steps"),             # more than the run's T = 100: names the cell
    (["--eta", "nan"], "--eta"),
    (["--eta", "-0.5"], "--eta"),
    (["--eta", "50"], "--eta"),                  # outside DDIM eq. 16's range for these steps
    (["--samplers", "ddpm", "--eta", "0.5"], "--eta"),
    (["--samplers", "ddim,bogus"], "--samplers"),
    (["--n", "0"], "--n"),
    (["--n", "1"], "--n"),
    (["--sample-batch-size", "0"], "--sample-batch-size"),
    (["--out", "@file/r.jsonl"], "--out"),
    (["--out", "@dir"], "--out"),
    (["--table", "@file/t.md"], "--table"),
    (["--table", "@dir"], "--table"),
])
def test_table_bad_input_is_one_line_before_any_work(tiny_run, ref8, tmp_path, capsys, monkeypatch, argv, flag):
    def work(*args, **kwargs):
        raise AssertionError("the work started before the input was checked")
    monkeypatch.setattr(sampling.Sampler, "generate", work)
    monkeypatch.setattr(fid, "inception_features", work)
    monkeypatch.setattr(fid, "load_inception", work)
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "dir").mkdir()
    argv = [str(tmp_path / a[1:]) if a.startswith("@") else a for a in argv]
    base = ["--checkpoint", tiny_run, "--steps", "2", "--ref", ref8, "--device", "cpu",
            "--out", str(tmp_path / "r.jsonl")]
    assert run(fid_table, base + argv) == 2
    assert one_line_error(capsys).startswith(f"error: {flag}")
    assert not (tmp_path / "r.jsonl").exists()


def test_every_table_default_is_in_help():
    sub = fid_table.build_parser()
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in formatter._expand_help(action), action.option_strings
    assert "GPU job" in fid_table.__doc__


# ----------------------------------------------------------------------------- torchrun

def free_port():
    """A port no one listens on now (bound to port 0, the system picks): parallel test runs never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ranks_draw_the_single_process_images(tiny_run, tmp_path):
    # 5 images in batches of 2: batches 0 and 2 on rank 0, batch 1 on rank 1, each with its (seed, i) generator; rank
    # 0 gathers them and writes one .npz, uint8-equal to the one-process run's
    # (--num-samples, not --n: torchrun would read --n as an abbreviation of its --nnodes, --nproc-per-node, ...)
    flags = ["--checkpoint", tiny_run, "--sampler", "ddpm", "--steps", "3", "--num-samples", "5", "--batch-size", "2",
             "--seed", "7", "--device", "cpu", "--no-progress"]
    assert run(sample, flags + ["--out", str(tmp_path / "one")]) == 0
    log = tmp_path / "writes.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), SHARD_LOG=str(log))
    done = subprocess.run(  # tests/shard_worker.py is sample.py, logging which rank writes the samples
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(ROOT / "tests" / "shard_worker.py"), *flags, "--out", str(tmp_path / "two" / "s")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = np.load(tmp_path / "one.npz")["x"], np.load(tmp_path / "two" / "s.npz")["x"]
    assert one.dtype == two.dtype == np.uint8 and one.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(two, one)
    assert sorted(os.listdir(tmp_path / "two")) == ["s.npz", "s.png"] and log.read_text() == "rank 0\n"  # rank 0 alone
    assert done.stdout.count("sampling 5 images") == 1 and done.stdout.count("wrote ") == 2  # and rank 0 alone talked


def test_torchrun_ranks_share_the_edit_batches(tiny_run, tmp_path):
    # --edit splits its variations across the ranks like plain sampling: 5 edits in batches of 2, batches 0 and 2 on
    # rank 0, batch 1 on rank 1 (never every rank doing all the work), and rank 0 alone writes the single-process files
    from PIL import Image
    picture = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(picture)
    flags = ["--checkpoint", tiny_run, "--edit", str(picture), "--steps", "3", "--num-samples", "5", "--batch-size",
             "2", "--seed", "7", "--device", "cpu", "--no-progress"]
    assert run(sample, flags + ["--out", str(tmp_path / "one")]) == 0
    log = tmp_path / "writes.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), SHARD_LOG=str(log))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(ROOT / "tests" / "shard_worker.py"), *flags, "--out", str(tmp_path / "two" / "s")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two" / "s.npz")
    assert one["x"].shape == (5, 8, 8, 3)
    for key in ("x", "input"):
        np.testing.assert_array_equal(two[key], one[key])
    assert sorted(log.read_text().splitlines()) == ["edit of 1 on rank 0", "edit of 2 on rank 0", "edit of 2 on rank 1",
                                                    "rank 0"]
    assert sorted(os.listdir(tmp_path / "two")) == ["s.npz", "s.png"]
    assert done.stdout.count("editing ") == 1 and done.stdout.count("wrote ") == 2
