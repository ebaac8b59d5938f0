"""The files sample.py, evaluate.py and figures.py write, seen from outside: real processes, real signals, a full disk.

What is pinned:
  * a full disk (ENOSPC) while a result is written is ONE line on stderr (`error: cannot write PATH: No space left on
    device; nothing was written`), exit code 1, and NOTHING is left: no temporary, no half of the .png/.npz pair (which
    would make the rerun refuse without --force), no half line in results.jsonl;
  * Ctrl-C (SIGINT) and SIGTERM while sampling, while computing Inception features, inside the matrix square root,
    while drawing a figure or while writing the files end the script with one line, exit 130 / 143, and leave only
    whole files it announced (no temporaries, no lock files);
  * two identical sample.py started at once: one writes, the other is refused in one line naming the file and
    --force; a rerun's refusal names the file and --force (and --out only when --out was typed).

HOW THE PROCESSES ARE STARTED. Importing torch, scipy and matplotlib costs seconds of CPU per process, and each test
here starts several processes. So one server process imports them once (multiprocessing's "forkserver", with those
modules preloaded) and forks a fresh process per command: a real process, with its own pid, signals and exit code,
that runs the script's file as `__main__` (runpy), exactly as `python SCRIPT ARGS` does after its imports. A
command's "patch" (a function of this file, run in that process before the script) stands in for the outside world:
a disk that fills up, an Inception network or a square root that takes long enough to be interrupted inside.
"""

import errno
import json
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one interpreter that imports everything once; every command below is a process forked from it
SERVER = multiprocessing.get_context("forkserver")
SERVER.set_forkserver_preload(["torch", "numpy", "scipy.linalg", "matplotlib.figure", "torchvision.utils", "cli",
                               "checkpoint", "sampling", "sample", "evaluate", "figures", __name__])


# ----------------------------------------------------------------------------------------------------------------
# Patches: what the outside world does to a process (each runs in the process, before the script)
# ----------------------------------------------------------------------------------------------------------------

def mark(text):
    """Tell the test where the process is (it polls the process's stdout for the text)."""
    sys.stdout.write(f"[{text}]\n")
    sys.stdout.flush()


def full_disk_in_savez():
    """The disk fills up while the .npz is written: a few bytes land in the file, then ENOSPC."""
    import numpy

    def savez(file, *args, **kwargs):
        (file.write if hasattr(file, "write") else open(file, "ab").write)(b"PK\x03\x04 half an npz")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    numpy.savez = savez


def full_disk_at_the_second_link():
    """The first file of the pair gets its name; naming the second fails with ENOSPC (a directory that must grow)."""
    real, calls = os.link, []

    def link(src, dst, **kwargs):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)
        return real(src, dst, **kwargs)
    os.link = link


def full_disk_in_results_jsonl():
    """results.jsonl's disk fills up mid-record: half the bytes written, then ENOSPC."""
    real = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl") and len(data) > 1:
            real(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    os.write = write


def full_disk_in_savefig():
    """The disk fills up while the figure's PNG is written."""
    import matplotlib.figure

    def savefig(self, fname, *args, **kwargs):
        (fname.write if hasattr(fname, "write") else open(fname, "ab").write)(b"\x89PNG half a picture")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    matplotlib.figure.Figure.savefig = savefig


def slow_savez():
    """Writing the .npz takes a while (a large array on a slow disk): long enough to be interrupted inside."""
    import numpy

    def savez(file, *args, **kwargs):
        (file.write if hasattr(file, "write") else open(file, "ab").write)(b"PK\x03\x04 the first bytes")
        mark("writing the npz")
        time.sleep(60)
    numpy.savez = savez


class FakeInception:
    """Stands for the FID Inception network (torch.jit.load's result): random [N, 2048] features, `delay` s a call."""

    def __init__(self, delay):
        self.delay, self.calls = delay, 0

    def __call__(self, x):
        import torch
        self.calls += 1
        if self.calls == 1 and self.delay:
            mark("inside inception")
        time.sleep(self.delay)
        return torch.randn(x.shape[0], 2048, dtype=torch.float32)

    def eval(self):
        return self

    def to(self, device):
        return self

    def parameters(self):
        import torch
        yield torch.zeros(1)


def fast_inception():
    import torch
    torch.jit.load = lambda *a, **k: FakeInception(0)


def slow_inception():
    import torch
    torch.jit.load = lambda *a, **k: FakeInception(0.05)


def slow_sqrtm():
    """Inside scipy's sqrtm for as long as it takes: scipy computes in C and Python handles a signal when the C call
    returns, so a long square root is stood for by many short real ones."""
    import scipy.linalg
    real = scipy.linalg.sqrtm

    def sqrtm(a, *args, **kwargs):
        mark("inside sqrtm")
        small = np.eye(64) + 0.01
        while True:
            real(small)
    scipy.linalg.sqrtm = sqrtm


def fast_inception_slow_sqrtm():
    fast_inception()
    slow_sqrtm()


# ----------------------------------------------------------------------------------------------------------------
# Running a script in its own process
# ----------------------------------------------------------------------------------------------------------------

def script_process(script, argv, out, err, patch):
    """In the forked process: stdout and stderr to files, the patch, then the script as `python SCRIPT ARGV` runs it.
    Its exit code is the process's (sys.exit in cli.main_guard)."""
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    import torch
    torch.set_num_threads(1)  # two cores for everyone: one each
    if patch is not None:
        globals()[patch]()
    sys.argv = [script] + list(argv)
    os.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


STARTED = []  # every process a test started: those still running when it ends are killed (a failed test's)


class Script:
    """`python SCRIPT ARGV` in a process of its own: wait for a line of its output, signal it, collect its end."""

    def __init__(self, folder, script, argv, patch=None, name=None):
        name = name or f"{script.split('.')[0]}-{patch or 'plain'}-{time.monotonic_ns()}"
        self.out, self.err = os.path.join(folder, f"{name}.out"), os.path.join(folder, f"{name}.err")
        self.process = SERVER.Process(target=script_process, args=(script, argv, self.out, self.err, patch))
        self.process.start()
        STARTED.append(self.process)

    def read(self, path):
        try:
            with open(path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for(self, text, timeout=60):
        """Until `text` is on its stdout (the script is where the test wants it); fails if it ended before."""
        deadline = time.monotonic() + timeout
        while text not in self.read(self.out):
            assert self.process.is_alive(), f"ended before {text!r}: {self.read(self.out)}{self.read(self.err)}"
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s: {self.read(self.out)}"
            time.sleep(0.02)
        return self

    def signal(self, signum):
        os.kill(self.process.pid, signum)
        return self

    def end(self, timeout=120):
        """(exit code, stdout, stderr) once it has ended."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            pytest.fail(f"still running after {timeout} s: {self.read(self.out)}{self.read(self.err)}")
        return self.process.exitcode, self.read(self.out), self.read(self.err)


def one_line(err, starts):
    """stderr is exactly one line, starting with `starts`, and no traceback."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(starts), err
    return lines[0]


def leftovers(folder):
    """What a stopped or failed writer must never leave: temporaries, lock files, earlier files set aside."""
    return sorted(f for f in os.listdir(folder) if any(k in f for k in (".tmp", ".lock", ".old")))


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    yield
    while STARTED:
        process = STARTED.pop()
        if process.is_alive():
            process.kill()
            process.join(10)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny.write(str(tmp_path_factory.mktemp("outputs") / "run"))


@pytest.fixture()
def logs(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    return str(folder)


def sample_argv(run, out, steps=2, n=4, *extra):
    return ["--checkpoint", run, "--steps", str(steps), "--n", str(n), "--device", "cpu", "--no-progress",
            *(["--out", out] if out else []), *extra]


# ----------------------------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------------------------

def test_a_full_disk_while_sample_py_writes_leaves_nothing_and_one_line(run, tmp_path, logs):
    out = str(tmp_path / "s")
    # ENOSPC while the .npz is written (after the .png): no half pair, no temporary, exit 1 in one line
    code, stdout, err = Script(logs, "sample.py", sample_argv(run, out), "full_disk_in_savez").end()
    line = one_line(err, "error: ")
    assert code == 1 and f"cannot write {out}.npz: No space left on device; nothing was written" in line, err
    assert "wrote" not in stdout and os.listdir(tmp_path) == ["logs"]
    # ENOSPC when the second file is given its name, the first one already named: the first is taken back
    code, stdout, err = Script(logs, "sample.py", sample_argv(run, out), "full_disk_at_the_second_link").end()
    assert code == 1 and "No space left on device; nothing was written" in one_line(err, "error: ")
    assert "wrote" not in stdout and os.listdir(tmp_path) == ["logs"]
    # so the rerun needs no --force
    code, stdout, err = Script(logs, "sample.py", sample_argv(run, out)).end()
    assert code == 0 and f"wrote {out}.npz" in stdout and np.load(out + ".npz")["x"].shape == (4, 8, 8, 3), err


def test_a_full_disk_while_results_jsonl_is_appended_leaves_it_as_it_was(run, tmp_path, logs):
    results = tmp_path / "r.jsonl"
    results.write_text('{"metric": "fid", "value": 3.0}\n')
    before = results.read_bytes()
    # `bpd` on one image: the cheapest result evaluate.py appends (fid's path to results.jsonl is the same function)
    code, stdout, err = Script(logs, "evaluate.py", ["bpd", "--checkpoint", run, "--n", "1", "--device", "cpu",
                                                     "--no-progress", "--out", str(results)],
                               "full_disk_in_results_jsonl").end()
    line = one_line(err, "error: ")
    assert code == 1 and f"cannot append to {results}: No space left on device" in line and "nothing was" in line, err
    assert results.read_bytes() == before, "a record is appended whole or not at all"
    assert json.loads(stdout.splitlines()[-1])["metric"] == "bpd", "the result still reaches the user (stdout)"


def test_a_full_disk_while_figures_py_writes_leaves_nothing(run, tmp_path, logs):
    out = tmp_path / "figs"
    code, stdout, err = Script(logs, "figures.py", [
        "ddim-consistency", "--checkpoint", run, "--out", str(out), "--n", "1", "--columns", "1,2", "--device", "cpu",
        "--no-progress"], "full_disk_in_savefig").end()
    line = one_line(err, "error: ")
    assert code == 1 and f"cannot write {out / 'ddim-consistency_seed0.png'}: No space left on device" in line, err
    assert os.listdir(out) == []


@pytest.fixture()
def tmpfs(tmp_path):
    """A real 64 kB file system (tmpfs), when this process may mount one (root); removed afterwards."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True,
                      timeout=30).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?): the full disk is simulated by the other tests")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def fill(folder):
    """Fill a file system to the last page: a filler file grown 4 kB at a time until ENOSPC."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_a_real_full_disk(run, tmpfs, logs):
    # sample.py: 512 8x8 images are a 98 kB .npz, beyond the 64 kB disk: ENOSPC, one line, nothing left on the disk
    out = str(tmpfs / "s")
    code, stdout, err = Script(logs, "sample.py", sample_argv(run, out, 1, 512, "--batch-size", "512")).end()
    assert code == 1 and "No space left on device; nothing was written" in one_line(err, "error: "), err
    assert os.listdir(tmpfs) == []
    # results.jsonl ending 19 bytes before a page boundary, the rest of the disk full: the old append wrote 19 bytes
    # of the record (half a line), then failed
    results = tmpfs / "r.jsonl"
    results.write_text('{"metric": "earlier", "pad": "' + "x" * (4096 - 19 - 33) + '"}\n')
    fill(tmpfs)
    before = results.read_bytes()
    code, stdout, err = Script(logs, "evaluate.py", ["bpd", "--checkpoint", run, "--n", "1", "--device", "cpu",
                                                     "--no-progress", "--out", str(results)]).end()
    assert code == 1 and "No space left on device" in one_line(err, "error: "), err
    assert results.read_bytes() == before and sorted(os.listdir(tmpfs)) == ["filler", "r.jsonl"]


# ----------------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM
# ----------------------------------------------------------------------------------------------------------------

def stopped(script, signum):
    """The end of an interrupted script: exit 128 + signal, one line on stderr naming the signal; its stdout."""
    code, stdout, err = script.end()
    assert code == 128 + signum, (code, err)
    line = one_line(err, signal.Signals(signum).name + ":")
    assert "stopped" in line and "nothing partial" in line, line
    return stdout


def test_ctrl_c_and_sigterm_stop_sample_py_cleanly(run, tmp_path, logs):
    outs = {name: str(tmp_path / name) for name in ("int", "term", "writing")}
    # while sampling (100 steps of 1024 images: minutes; stopped after its banner), and while writing the .npz
    sampling_int = Script(logs, "sample.py", sample_argv(run, outs["int"], 100, 1024))
    sampling_term = Script(logs, "sample.py", sample_argv(run, outs["term"], 100, 1024))
    writing = Script(logs, "sample.py", sample_argv(run, outs["writing"]), "slow_savez")
    sampling_int.wait_for("sampling 1024 images").signal(signal.SIGINT)
    sampling_term.wait_for("sampling 1024 images").signal(signal.SIGTERM)
    writing.wait_for("[writing the npz]").signal(signal.SIGTERM)
    for script, signum in ((sampling_int, signal.SIGINT), (sampling_term, signal.SIGTERM),
                           (writing, signal.SIGTERM)):
        assert "wrote" not in stopped(script, signum)
    # nothing was written: not the .png without its .npz (the rerun would be refused), no temporary, no lock
    assert sorted(os.listdir(tmp_path)) == ["logs"], os.listdir(tmp_path)


def test_ctrl_c_and_sigterm_stop_evaluate_py_cleanly(run, tmp_path, logs):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048), image_size=np.array(8))
    (tmp_path / "inception.pt").write_bytes(b"stands for the network")
    results = tmp_path / "r.jsonl"
    results.write_text('{"metric": "earlier"}\n')

    def fid(name, steps, n, patch):
        return Script(logs, "evaluate.py", [
            "fid", "--checkpoint", run, "--steps", str(steps), "--n", str(n), "--ref", str(tmp_path / "ref.npz"),
            "--inception", str(tmp_path / "inception.pt"), "--batch-size", "1", "--device", "cpu", "--no-progress",
            "--out", str(results), "--save-samples", str(tmp_path / name)], patch)
    sampling = fid("sampling", 100, 1024, "fast_inception")
    features = fid("features", 2, 64, "slow_inception")
    sqrtm = fid("sqrtm", 2, 8, "fast_inception_slow_sqrtm")
    sampling.wait_for("sampling 1024 images").signal(signal.SIGTERM)
    features.wait_for("[inside inception]").signal(signal.SIGINT)
    sqrtm.wait_for("[inside sqrtm]").signal(signal.SIGTERM)
    assert "wrote" not in stopped(sampling, signal.SIGTERM)
    for script, signum, name in ((features, signal.SIGINT, "features"), (sqrtm, signal.SIGTERM, "sqrtm")):
        stdout = stopped(script, signum)
        # the samples were written (and announced) before the scoring: kept, whole
        assert f"wrote {tmp_path / name}.npz" in stdout and np.load(tmp_path / f"{name}.npz")["x"].shape[0] > 0
    assert results.read_text() == '{"metric": "earlier"}\n', "no result line, and no half of one"
    assert sorted(f for f in os.listdir(tmp_path) if f != "logs") == [
        "features.npz", "features.png", "inception.pt", "r.jsonl", "ref.npz", "sqrtm.npz", "sqrtm.png"]


def test_ctrl_c_stops_figures_py_cleanly(run, tmp_path, logs):
    out = tmp_path / "figs"
    figure = Script(logs, "figures.py", ["ddpm-x0", "--checkpoint", run, "--out", str(out), "--n", "1024",
                                         "--device", "cpu", "--no-progress"])
    figure.wait_for("ddpm-x0: ").signal(signal.SIGINT)
    stopped(figure, signal.SIGINT)
    assert os.listdir(out) == []


# ----------------------------------------------------------------------------------------------------------------
# One name, one writer
# ----------------------------------------------------------------------------------------------------------------

def test_two_sample_py_writing_one_name_at_once_one_is_refused(tmp_path, logs):
    run = tiny.write(str(tmp_path / "race"))
    argv = sample_argv(run, None, 5, 32)
    # two identical commands at once, on the run's default name (no --out): one writes, the other is refused in one
    # line (before its work: the winner holds the name from its start), and never replaces the winner's files
    a, b = Script(logs, "sample.py", argv, name="a"), Script(logs, "sample.py", argv, name="b")
    ends = [a.end(), b.end()]
    assert sorted(code for code, _, _ in ends) == [0, 2], ends
    (_, winner, _), (_, _, loser) = sorted(ends, key=lambda end: end[0])
    png = os.path.join(run, "samples", "ddim5_seed0_n32.png")
    line = one_line(loser, "error: ")
    # the file and --force; not --out, which nobody typed
    assert line.startswith(f"error: {png} ") and "--force" in line and "--out" not in line, line
    assert f"wrote {png}" in winner and np.load(png[:-4] + ".npz")["x"].shape == (32, 8, 8, 3)
    assert sorted(os.listdir(os.path.dirname(png))) == ["ddim5_seed0_n32.npz", "ddim5_seed0_n32.png"]
    # the same command again: refused the same way (the file and --force; it used to say "--out: ... exists")
    code, stdout, err = Script(logs, "sample.py", argv).end()
    line = one_line(err, "error: ")
    assert code == 2 and line == f"error: {png} already exists; pass --force to replace it", line
    # with --out typed, the message names it
    code, stdout, err = Script(logs, "sample.py", argv + ["--out", png[:-4]]).end()
    line = one_line(err, "error: ")
    assert code == 2 and line.startswith(f"error: --out: {png} already exists; pass --force") and "--out" in line


def test_a_writer_killed_by_sigkill_neither_blocks_nor_litters_the_next(run, tmp_path, logs):
    out = str(tmp_path / "s")
    # SIGKILL (no clean-up at all) while the .npz is written: the temporaries and the lock files stay behind
    killed = Script(logs, "sample.py", sample_argv(run, out), "slow_savez")
    killed.wait_for("[writing the npz]").signal(signal.SIGKILL)
    assert killed.end()[0] == -signal.SIGKILL
    assert leftovers(tmp_path) == ["s.npz.lock", f"s.npz.tmp{killed.process.pid}", "s.png.lock",
                                   f"s.png.tmp{killed.process.pid}"]
    # the lock died with its process: the same command runs, and clears what the dead writer left
    code, stdout, err = Script(logs, "sample.py", sample_argv(run, out)).end()
    assert code == 0 and f"wrote {out}.npz" in stdout, err
    assert sorted(os.listdir(tmp_path)) == ["logs", "s.npz", "s.png"]


# ----------------------------------------------------------------------------------------------------------------
# outputs.write and outputs.append_line in this process (the rare paths, cheaply)
# ----------------------------------------------------------------------------------------------------------------

def test_a_forced_rewrite_that_fails_keeps_the_earlier_pair(tmp_path, monkeypatch):
    import cli
    import outputs
    pair = {str(tmp_path / "a.png"): b"old png", str(tmp_path / "a.npz"): b"old npz"}
    outputs.write({p: (lambda f, c=c: f.write(c)) for p, c in pair.items()})

    def full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    # the disk fills up in the second new file
    with pytest.raises(cli.OutputError, match=r"cannot write .*a\.npz: No space left on device; nothing was written"):
        outputs.write({str(tmp_path / "a.png"): lambda f: f.write(b"new png"), str(tmp_path / "a.npz"): full},
                      force=True)
    assert {p: open(p, "rb").read() for p in pair} == pair and sorted(os.listdir(tmp_path)) == ["a.npz", "a.png"]
    # the second name fails, the first new file already in place: it is taken back, the earlier one restored
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(cli.OutputError, match="Input/output error; nothing was written"):
        outputs.write({p: lambda f: f.write(b"new") for p in pair}, force=True)
    assert {p: open(p, "rb").read() for p in pair} == pair and sorted(os.listdir(tmp_path)) == ["a.npz", "a.png"]


def test_ctrl_c_while_the_pair_is_named_waits_until_both_are(tmp_path, monkeypatch):
    import outputs
    real = os.link

    def link(src, dst, **kwargs):  # Ctrl-C arrives between the two names
        os.kill(os.getpid(), signal.SIGINT)
        return real(src, dst, **kwargs)
    monkeypatch.setattr(os, "link", link)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C, whatever runs pytest
    try:
        with pytest.raises(KeyboardInterrupt):
            outputs.write({str(tmp_path / "a.png"): lambda f: f.write(b"png"),
                           str(tmp_path / "a.npz"): lambda f: f.write(b"npz")})
    finally:
        signal.signal(signal.SIGINT, previous)
    # raised once both had their names: the pair is whole, and nothing else is left
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "a.png"] and (tmp_path / "a.npz").read_bytes() == b"npz"


def test_append_line_starts_a_line_of_its_own(tmp_path):
    import outputs
    log = tmp_path / "r.jsonl"
    log.write_text('{"a": 1}\n{"half a li')  # another tool died mid-line
    outputs.append_line(str(log), '{"b": 2}')
    assert log.read_text().splitlines() == ['{"a": 1}', '{"half a li', '{"b": 2}']
