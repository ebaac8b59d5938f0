"""train.py end to end on a tiny U-Net and a tiny synthetic dataset (CPU, fp32).

Real processes where the behaviour is about processes: SIGKILL / SIGINT / SIGTERM sent to a real `python train.py`,
two trainers racing for one folder, torchrun with two ranks, the exit status and output the shell sees. The many
bad-input cases run as forked children of the test process (a real process each, with its own exit status, stdout
and stderr, but without a fresh interpreter's ~5 s import of torch); one case runs from a fresh interpreter.
"""

import errno
import fcntl
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import runs
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--synthetic-n", "64", "--image-size", "8", "--ch", "16", "--ch-mult", "1,2",
        "--num-res-blocks", "1", "--attn", "4", "--batch-size", "8", "--diffusion-steps", "100", "--warmup", "5",
        "--log-every", "5", "--save-every", "10", "--sample-every", "0", "--n-sample", "0", "--no-progress",
        "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=ENV)


@pytest.fixture
def start():
    """start(*argv): a real process in the background, in its own session (a signal reaches it alone); whatever the
    test's outcome, its whole session is killed at the end, so no trainer outlives a failed test."""
    procs = []

    def start(*argv, script="train.py"):
        procs.append(subprocess.Popen([sys.executable, *argv] if script is None else
                                      [sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT, env=ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, proc=None, timeout=150):
    deadline = time.time() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def forked(argv):
    """train.main(argv) in a forked child: (exit status, stdout, stderr) as a shell would see them."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 70
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                train.main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read(), err.read()


def assert_one_line_exit(result, code, *words):
    rc, _, err = result
    lines = err.strip().splitlines()
    assert rc == code and len(lines) == 1 and "Traceback" not in err, (rc, err)
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 10-step run (checkpoint at step 10), shared by the tests that only read it or refuse to touch it."""
    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    train.main(TINY + ["--steps", "10", "--out", out])
    return out


# ----------------------------------------------------------------------------------------------------------------
# A run, and what it writes and says
# ----------------------------------------------------------------------------------------------------------------

def test_loss_falls_and_the_run_folder_holds_what_was_announced(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(TINY + ["--steps", "30", "--lr", "2e-3", "--log-every", "10", "--save-every", "15", "--dropout", "0",
                       "--n-sample", "4", "--out", out])
    said = capsys.readouterr().out
    m = metrics(out)
    # L_simple starts near 1 (a zero-initialised output predicts eps = 0) and must fall well below it
    assert [r["step"] for r in m] == [10, 15, 20, 30]
    assert m[0]["loss"] > 0.5 and m[-1]["loss"] < 0.6 * m[0]["loss"], [r["loss"] for r in m]
    assert {"step", "loss", "lr", "img_per_s", "elapsed_s"} <= set(m[-1])

    # format 2: the checkpoint describes its network and diffusion; checkpoint.py alone rebuilds it
    ckpt = load(out)
    assert ckpt["format"] == 2 and ckpt["kind"] == "diffusion" and ckpt["step"] == 30
    assert ckpt["model_args"]["ch"] == 16 and ckpt["model_args"]["ch_mult"] == [1, 2]
    assert ckpt["diffusion_args"] == {"schedule": "linear", "timesteps": 100, "var_type": "fixed_large",
                                      "loss_type": "mse"}
    assert ckpt["config"]["lr"] == 2e-3 and {"optimizer", "batches", "rng", "ema_updates"} <= set(ckpt)
    assert ckpt["config"]["n_train"] == 64  # --synthetic-n reaches data.load_dataset
    net = checkpoint.build_network(checkpoint.load(out))
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in net.state_dict().items())
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["steps"] == 30 and [h["event"] for h in config["history"]] == ["start"]

    # the pictures of training: the grid at the first checkpoint (and the end; its 8x8 images drawn 4x, data.readable),
    # the loss curve at every save
    for name, size in (("samples.png", (2 * 32 + 3 * 2,) * 2), ("samples_0000015.png", None), ("loss.png", None)):
        with Image.open(os.path.join(out, name)) as im:
            assert im.format == "PNG" and (size is None or im.size == size), (name, im.size)
    assert not os.path.exists(os.path.join(out, "samples_0000010.png"))  # grids come with checkpoints here

    # every output announced: where, what data, device, model, when the first checkpoint comes, each save, what next
    for words in ("run folder: " + out, "data: synthetic (64 generated images", "device: cpu", "precision: fp32",
                  "0.18M parameters", "first checkpoint: step 15", f"wrote {out}/ckpt.pt", "step 15)",
                  f"wrote {out}/samples.png", "done: step 30/30",
                  f"next: python sample.py --checkpoint {out} --sampler ddim --steps 50"):
        assert words in said, (words, said)
    assert said.count("ckpt.pt (") == 2  # one line per checkpoint save


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in train.build_parser()._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert f"(default: {action.default})" in text, (action.option_strings, action.default)
    for words in ("L_simple (DDPM eq. 14)", "Algorithm 1 line 3", "(DDPM: 0.9999)", "iDDPM §3.3"):
        assert words in text


def test_max_minutes_includes_the_end_of_the_run(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "budget")
    real = checkpoint.save

    def slow_save(obj, path):  # a slow disk: every checkpoint takes 1.5 s, the final one included
        time.sleep(1.5)
        real(obj, path)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    import torch._dynamo  # noqa: F401 (AdamW imports it once per process, seconds on a busy machine: not measured here)
    t0 = time.perf_counter()
    # a 256-image grid at the end would take seconds too: it must shrink to fit, or be skipped, inside the budget
    train.main(TINY + ["--steps", "100000", "--max-minutes", "0.1", "--n-sample", "256", "--out", out])
    took = time.perf_counter() - t0
    said = capsys.readouterr().out
    assert took < 6 + 2.0, (took, said)  # 2 s: a margin for a CI machine whose other core runs other tests
    assert "--max-minutes 0.1 reached" in said and "resume with: python train.py --resume" in said
    assert re.search(r"sampling \d+ images \(of --n-sample 256|sample grid skipped", said), said
    assert 0 < load(out)["step"] < 100000


# ----------------------------------------------------------------------------------------------------------------
# Resume: exact, trimmed, with the flags it may change
# ----------------------------------------------------------------------------------------------------------------

def test_kill_then_resume_equals_uninterrupted(tmp_path, start):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    args = TINY + ["--steps", "30", "--n-sample", "4"]
    train.main(args + ["--out", full])
    # the same run in a real process, SIGKILLed once its first checkpoint (step 10) exists
    proc = start(*args, "--out", killed)
    ckpt, lock = os.path.join(killed, "ckpt.pt"), os.path.join(killed, "train.lock")
    wait_for(lambda: os.path.exists(ckpt), proc)
    with open(lock) as f:
        with pytest.raises(BlockingIOError):  # the run folder is locked while the trainer lives ...
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ... and the OS releases it when the trainer dies
    saved = load(killed)  # whatever moment the kill hit, the file on disk is whole
    assert saved["step"] in (10, 20, 30)
    train.main(args + ["--out", killed, "--resume"])
    a, b = load(full), load(killed)
    assert a["step"] == b["step"] == 30
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    # metrics.jsonl was cut back to the checkpoint: every step once, the same losses as the uninterrupted run
    assert [(r["step"], r["loss"]) for r in metrics(killed)] == [(r["step"], r["loss"]) for r in metrics(full)]


def test_resume_trims_metrics_and_removes_stale_temporaries(tmp_path, capsys):
    out = str(tmp_path / "r")
    train.main(TINY + ["--steps", "10", "--out", out])
    # as a run killed after logging steps 15 and 20 would leave it, plus a temporary of a writer that died mid-save
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 15, "loss": 123.0}) + "\n" + json.dumps({"step": 20, "loss": 123.0}) + "\n{\"st")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = os.path.join(out, f"ckpt.pt.tmp{dead.pid}")
    with open(stale, "wb") as f:
        f.write(b"half a checkpoint")
    capsys.readouterr()
    train.main(TINY + ["--steps", "20", "--out", out, "--resume"])
    assert not os.path.exists(stale) and f"removed {stale}" in capsys.readouterr().out
    m = metrics(out)
    assert [r["step"] for r in m] == [5, 10, 15, 20] and 123.0 not in [r["loss"] for r in m]


def test_resume_applies_optimisation_flags_and_records_them(tmp_path, capsys):
    out = str(tmp_path / "r")
    train.main(TINY + ["--steps", "10", "--out", out])
    capsys.readouterr()
    train.main(TINY + ["--steps", "20", "--lr", "5e-4", "--grad-clip", "0.5", "--out", out, "--resume"])
    said = capsys.readouterr().out
    assert "resume: --steps 10 -> 20, --lr 0.0002 -> 0.0005, --grad-clip 1.0 -> 0.5 (applied" in said, said
    assert [r["lr"] for r in metrics(out)] == [2e-4, 2e-4, 5e-4, 5e-4]  # the new lr is the one used
    ckpt = load(out)
    assert ckpt["step"] == 20 and ckpt["config"]["lr"] == 5e-4 and ckpt["config"]["grad_clip"] == 0.5
    history = json.load(open(os.path.join(out, "config.json")))["history"]
    assert [(h["event"], h["step"]) for h in history] == [("start", 0), ("resume", 10)]
    assert history[1]["changed"] == {"steps": {"from": 10, "to": 20}, "lr": {"from": 2e-4, "to": 5e-4},
                                     "grad_clip": {"from": 1.0, "to": 0.5}}
    # a flag not typed keeps the checkpoint's value, not the parser's default
    train.main(["--out", out, "--resume", "--steps", "25", "--device", "cpu", "--no-progress"])
    assert load(out)["config"]["lr"] == 5e-4 and metrics(out)[-1]["lr"] == 5e-4


@pytest.mark.parametrize("extra, flag", [
    (["--seed", "7"], "--seed"),
    (["--batch-size", "4"], "--batch-size"),
    (["--synthetic-n", "32"], "--synthetic-n"),
    (["--ch", "32"], "--ch"),
    (["--loss", "hybrid"], "--loss"),
    (["--steps", "5"], "--steps"),     # below the checkpoint's step 10
    (["--steps", "10"], "--steps"),    # the run is already there
])
def test_resume_refuses_what_would_break_it(tiny_run, extra, flag):
    before = os.path.getmtime(os.path.join(tiny_run, "ckpt.pt"))
    assert_one_line_exit(forked(TINY + ["--steps", "20", "--out", tiny_run, "--resume"] + extra), 2, flag)
    assert os.path.getmtime(os.path.join(tiny_run, "ckpt.pt")) == before


def test_a_new_run_never_touches_another_runs_files(tiny_run, tmp_path):
    assert_one_line_exit(forked(TINY + ["--steps", "20", "--out", tiny_run]), 2, "--out", "--resume")
    # a folder with only another run's metrics (it died before its first checkpoint): not appended to
    out = tmp_path / "old"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    assert_one_line_exit(forked(TINY + ["--steps", "20", "--out", str(out)]), 2, "--out", "metrics.jsonl")
    assert (out / "metrics.jsonl").read_text() == '{"step": 5, "loss": 1.0}\n'
    assert_one_line_exit(forked(TINY + ["--out", str(tmp_path / "none"), "--resume"]), 2, "--resume")


# ----------------------------------------------------------------------------------------------------------------
# Never keep bad work
# ----------------------------------------------------------------------------------------------------------------

def test_divergence_is_not_saved_and_the_advised_recovery_trains_on(tmp_path, capsys):
    out = str(tmp_path / "nan")
    train.main(TINY + ["--steps", "10", "--out", out])
    good = load(out)
    # a learning rate of 1e6: the update of step 11 leaves finite but useless weights (their loss is nan); with a
    # save right after it, that checkpoint must not replace the good one
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--steps", "40", "--lr", "1e6", "--save-every", "1", "--out", out, "--resume"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0] and f"{out}/ckpt.pt (step 10)" in err[0], err
    ckpt = load(out)
    assert ckpt["step"] == 10 and all(torch.equal(ckpt["model"][k], v) for k, v in good["model"].items())
    # the advice, followed to the letter, trains on
    advice = err[0].split("resume it with a lower learning rate: ")[1]
    argv = shlex.split(advice)[2:]
    assert argv[:3] == ["--resume", "--out", out] and "--lr" in argv
    train.main(argv + ["--steps", "20", "--save-every", "10", "--no-progress"])
    ckpt = load(out)
    assert ckpt["step"] == 20 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(r["loss"] < 2 for r in metrics(out))


def test_divergence_before_any_checkpoint_says_none_exists(tmp_path, capsys):
    out = str(tmp_path / "nan0")
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--steps", "40", "--lr", "1e6", "--warmup", "0", "--log-every", "1", "--out", out])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint was saved" in err[0] and "--lr" in err[0], err
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "enospc")
    train.main(TINY + ["--steps", "10", "--out", out])
    good = load(out)
    real = torch.save

    def disk_full(obj, f, *a, **k):  # writes a part, then the disk is full
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--steps", "20", "--out", out, "--resume"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "(step 10) is intact" in err[0], err
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "loss.png", "metrics.jsonl", "train.lock"]
    monkeypatch.setattr(checkpoint.torch, "save", real)
    ckpt = load(out)
    assert ckpt["step"] == 10 and all(torch.equal(ckpt["model"][k], v) for k, v in good["model"].items())


def test_running_out_of_device_memory_is_one_line(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "oom")
    real = train.train_step

    def step(step, *a, **k):
        if step == 12:  # what torch raises when an allocation on the GPU fails
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(step, *a, **k)

    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--steps", "20", "--out", out])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lower --batch-size" in err[0] and "(step 10) is intact" in err[0], err


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB tmpfs (needs root and mount rights; skipped elsewhere: the injected OSError test covers it)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_really_full_disk(small_disk, capsys):
    out = str(small_disk / "run")
    train.main(TINY + ["--steps", "10", "--out", out])
    # fill the disk, leaving less than a checkpoint free
    free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
    with open(small_disk / "filler", "wb") as f:
        f.write(b"\0" * (free - os.path.getsize(os.path.join(out, "ckpt.pt")) // 2))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--steps", "20", "--out", out, "--resume"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert not [f for f in os.listdir(out) if ".tmp" in f] and load(out)["step"] == 10
    os.remove(small_disk / "filler")  # the advice: free some space, then resume
    train.main(TINY + ["--steps", "20", "--out", out, "--resume"])
    assert load(out)["step"] == 20


# ----------------------------------------------------------------------------------------------------------------
# Signals and the folder lock, with real processes
# ----------------------------------------------------------------------------------------------------------------

def test_sigint_finishes_the_step_saves_and_says_how_to_resume(tmp_path, start):
    out = str(tmp_path / "int")
    proc = start(*[a for a in TINY if a != "--no-progress"], "--steps", "100000", "--log-every", "1",
                 "--save-every", "1000", "--out", out)
    wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")) and len(metrics(out)) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    step = load(out)["step"]
    assert f"stopped by SIGINT at step {step}" in stdout and f"saved {out}/ckpt.pt" in stdout, stdout
    assert f"resume with: python train.py --resume --out {out} --device cpu" in stdout
    assert "SIGINT: finishing this step, then saving" in stderr
    # what the user saw while it ran: the announcements, and the bar with the loss and a readable ETA
    for words in ("run folder:", "data: synthetic", "device: cpu", "parameters", "first checkpoint: step 1,000"):
        assert words in stdout, words
    assert re.search(r"train: +\d+%\|.*\| \d+/100000 \[.*ETA .*(s|min|h|days),.*loss \d\.\d{4}", stderr), stderr
    train.main(["--resume", "--out", out, "--device", "cpu", "--steps", str(step + 2)])
    assert load(out)["step"] == step + 2


def test_sigterm_saves_and_a_second_trainer_is_refused_naming_the_pid(tmp_path, start):
    out = str(tmp_path / "term")
    proc = start(*TINY, "--steps", "100000", "--save-every", "1000", "--out", out)
    wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")) and len(metrics(out)) >= 1, proc)
    # a second trainer into the same folder (a fresh interpreter, as from the shell), even with --resume: refused
    # with one line while the first holds the lock
    other = run_cli(*TINY, "--steps", "100000", "--out", out, "--resume")
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        f"error: --out: {out} is in use by another train.py (pid {proc.pid}); wait for it to finish, stop it, or "
        "choose another --out"], other.stderr
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert f"stopped by SIGTERM at step {load(out)['step']}" in stdout and "resume with: " in stdout


def test_loss_png_shows_a_run_stopped_after_one_log_line(tmp_path):
    """A run stopped early (Ctrl-C after a few steps of the full recipe on a CPU) has one logged loss: loss.png draws
    it as a dot in the middle of the plot, not an empty frame (a line through one point draws nothing)."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 0.9991}) + "\n")
    runs.plot_loss(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"))
    with Image.open(tmp_path / "loss.png") as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    blue = (rgb[..., 2] - rgb[..., 0]) > 60  # tab:blue, at the raw line's alpha
    h, w = blue.shape
    assert blue[h // 4: 3 * h // 4, w // 3: 2 * w // 3].sum() > 10  # the middle of the axes: the dot, no legend


def test_a_second_ctrl_c_stops_at_once(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "twice")
    real = train.train_step

    def step_interrupted_twice(step, *a, **k):
        if step == 12:  # the user presses Ctrl-C, and again: both are real signals, handled by train.py's handler
            os.kill(os.getpid(), signal.SIGINT)
            signals = signal.getsignal(signal.SIGINT).__self__  # the run's runs.Signals, whose handler is installed
            while not signals.signum:  # (Python runs a signal's handler between bytecodes)
                pass
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, *a, **k)

    monkeypatch.setattr(train, "train_step", step_interrupted_twice)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--steps", "40", "--out", out])
    assert e.value.code == 130
    said = capsys.readouterr().out
    assert f"stopped at once at step 12 by a second signal: nothing saved since; the last checkpoint is {out}/ckpt.pt " \
           "(step 10)" in said, said
    assert load(out)["step"] == 10
    assert signal.getsignal(signal.SIGINT) is handler  # train.py gives the handlers back


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the flag, exit 2, before any work
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, flag", [
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--dropout", "2"], "--dropout"),
    (["--synthetic-n", "0"], "--synthetic-n"),
    (["--num-heads", "0"], "--num-heads"),
    (["--num-heads", "3"], "--num-heads"),
    (["--num-head-channels", "7"], "--num-head-channels"),
    (["--num-head-channels", "0"], "--num-head-channels"),
    (["--task", "classifier", "--eval-every", "0"], "--eval-every"),
    (["--grad-clip", "nan"], "--grad-clip"),
    (["--max-minutes", "nan"], "--max-minutes"),
    (["--save-minutes", "-1"], "--save-minutes"),
    (["--sample-minutes", "inf"], "--sample-minutes"),
    (["--ema", "1"], "--ema"),
    (["--p-uncond", "nan"], "--p-uncond"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--warmup", "-5"], "--warmup"),
    (["--attn", "7"], "--attn"),
    (["--ch-mult", "1,x"], "--ch-mult"),
    (["--image-size", "12", "--ch-mult", "1,2,2,2"], "--image-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--log-every", "0"], "--log-every"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--data-dir", "/nonexistent"], "--data-dir"),
    (["--dataset", "cifar10", "--image-size", "32", "--attn", "16", "--data-dir", "/nonexistent"], "--data-dir"),
    (["--task", "classifier", "--class-cond"], "--class-cond"),
    (["--task", "classifier", "--t-sampler", "importance"], "--t-sampler"),
    (["--device", "tpu9"], "--device"),
    (["--out", "/proc/forbidden/run"], "--out"),
    (["--out", ""], "--out"),
    (["--seed", "99999999999999999999"], "--seed"),
    (["--diffusion-steps", "100000000"], "--diffusion-steps"),
    (["--ch", "100000"], "--ch"),  # 160 GB of weights: refused before anything is allocated
])
def test_bad_input_exits_2_with_one_line(tmp_path, extra, flag):
    out = str(tmp_path / "r")
    assert_one_line_exit(forked(TINY + ["--steps", "1", "--out", out] + extra), 2, "error:", flag)
    assert not os.path.exists(out)  # refused before any work, and the run folder it made is gone with its lock


# ----------------------------------------------------------------------------------------------------------------
# What else trains: learned variances, importance sampling, class conditioning, the classifier, DDP
# ----------------------------------------------------------------------------------------------------------------

def test_hybrid_importance_sampling_and_class_conditioning(tmp_path):
    out = str(tmp_path / "h")
    train.main(TINY + ["--steps", "20", "--loss", "hybrid", "--t-sampler", "importance", "--schedule", "cosine",
                       "--class-cond", "--n-sample", "4", "--out", out])
    ckpt = checkpoint.load(out)
    assert ckpt["t_sampler"]["counts"].sum().item() == 20 * 8
    assert ckpt["diffusion_args"]["var_type"] == "learned_range" and ckpt["diffusion_args"]["schedule"] == "cosine"
    model = checkpoint.build_network(ckpt)
    assert model.out_channels == 6 and model.num_classes == 2  # learned variances; 2 classes + the null label
    assert os.path.exists(os.path.join(out, "samples.png"))


def test_classifier_task(tmp_path, capsys):
    out = str(tmp_path / "clf")
    train.main(TINY + ["--task", "classifier", "--steps", "40", "--lr", "1e-3", "--eval-every", "40", "--out", out])
    said = capsys.readouterr().out
    assert "test accuracy at noise level t=0:" in said and "--classifier " + out in said
    last = metrics(out)[-1]
    # the two synthetic classes are easy at t = 0; accuracy is logged at T/4-spaced noise levels
    assert last["acc_t0"] > 0.9 and {"acc_t25", "acc_t50", "acc_t75"} <= set(last), last
    ckpt = checkpoint.load(out)
    assert ckpt["kind"] == "classifier" and checkpoint.num_classes_of(ckpt) == 2
    assert checkpoint.build_network(ckpt)(torch.zeros(3, 3, 8, 8), torch.zeros(3, dtype=torch.long)).shape == (3, 2)


def test_save_minutes_checkpoints_a_slow_run(tmp_path, monkeypatch):
    out = str(tmp_path / "slow")
    clock = {"t": 0.0}

    def fake_clock():  # every call advances 20 s: the run looks slow
        clock["t"] += 20.0
        return clock["t"]

    saved_steps = []
    real_save = checkpoint.save
    monkeypatch.setattr(runs.time, "perf_counter", fake_clock)
    monkeypatch.setattr(checkpoint, "save", lambda obj, path: (saved_steps.append(obj["step"]), real_save(obj, path)))
    train.main(TINY + ["--steps", "6", "--save-every", "1000", "--log-every", "1000", "--save-minutes", "1",
                       "--sample-minutes", "0", "--out", out])
    # no --save-every or --log-every step comes before step 6, yet the clock checkpointed the run on the way
    assert saved_steps[-1] == 6 and len(saved_steps) >= 2 and saved_steps[0] < 6, saved_steps


def test_ddp_ranks_agree_on_a_sigterm_and_resume_on_one_process(tmp_path, capsys, start):
    out = str(tmp_path / "ddp")
    torchrun = start("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                     os.path.join(ROOT, "tests", "ddp_worker.py"), *TINY, "--steps", "100000", "--log-every", "2",
                     "--save-every", "1000", "--out", out, script=None)
    wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")) and len(metrics(out)) >= 2, torchrun)
    # SIGTERM to rank 1 alone: rank 0 learns of it only through the stop flag combined at the next log step
    os.kill(int(open(os.path.join(out, "pid1")).read()), signal.SIGTERM)
    _, stderr = torchrun.communicate(timeout=120)
    a = torch.load(os.path.join(out, "rank0.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "rank1.pt"), weights_only=True)
    ckpt = load(out)
    # both ranks stopped after the same step (else one would wait for the other forever), with the same weights
    assert a["step"] == b["step"] == ckpt["step"] and a["outcome"] == b["outcome"] == "SIGTERM", stderr[-3000:]
    assert all(torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["model"][k], ckpt["model"][k])
               for k in a["model"])
    # the run goes on in one process, and says the data order is no longer the uninterrupted run's
    capsys.readouterr()
    train.main(TINY + ["--out", out, "--resume", "--steps", str(ckpt["step"] + 2), "--log-every", "2",
                       "--save-every", "1000"])
    assert "data order and noise are no longer those of the uninterrupted run" in capsys.readouterr().out
    assert load(out)["step"] == ckpt["step"] + 2


# ----------------------------------------------------------------------------------------------------------------
# --task ddgan: Denoising Diffusion GANs (Xiao et al. 2022) on the same machinery
# ----------------------------------------------------------------------------------------------------------------

# TINY's network and data, without the DDPM-only choices (--diffusion-steps, --warmup): those come from the recipe
DDGAN_TINY = ["--task", "ddgan", "--dataset", "synthetic", "--synthetic-n", "32", "--image-size", "8", "--ch", "16",
              "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn", "4", "--batch-size", "8", "--d-ch", "8",
              "--latent-dim", "8", "--lazy-reg", "2", "--lr", "1e-3", "--lr-d", "1e-3", "--log-every", "1",
              "--save-every", "3", "--sample-every", "0", "--n-sample", "4", "--no-progress", "--device", "cpu"]


def test_ddgan_trains_with_the_recipe_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train.main(DDGAN_TINY + ["--steps", "6", "--out", full])
    said = capsys.readouterr().out

    # the losses of both players are logged, finite, every step; the grid is the EMA generator's 4-step chain
    m = metrics(full)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["d_loss"]) and math.isfinite(r["g_loss"]) for r in m), m
    assert f"wrote {full}/samples.png (" in said, said
    for words in ("DDGAN generator (nz 8)", "vp schedule, T=4", "R1 gamma 0.02 every 2 steps",
                  f"next: python sample.py --checkpoint {full} --sampler ddgan"):
        assert words in said, (words, said)
    for name in ("samples.png", "loss.png"):
        with Image.open(os.path.join(full, name)) as im:
            assert im.format == "PNG"

    # the checkpoint: kind ddgan, G's model_args (+ nz), D's, the 4-step vp diffusion, D and its optimizer
    ckpt = load(full)
    assert ckpt["kind"] == "ddgan" and ckpt["step"] == 6
    assert ckpt["model_args"]["latent_dim"] == 8 and ckpt["model_args"]["ch"] == 16
    assert ckpt["discriminator_args"]["in_channels"] == 6 and ckpt["discriminator_args"]["out_dim"] == 1
    assert ckpt["diffusion_args"] == {"schedule": "vp", "timesteps": 4}
    assert {"discriminator", "optimizer_d", "optimizer", "ema", "rng"} <= set(ckpt)
    assert ckpt["ema_updates"] == 6  # the EMA of G follows every step
    for key in ("optimizer", "optimizer_d"):  # DDGAN's Adam betas, G and D alike
        assert tuple(ckpt[key]["param_groups"][0]["betas"]) == (0.5, 0.9), key
    # untyped flags took the paper's recipe, typed ones stayed
    cfg = ckpt["config"]
    assert (cfg["diffusion_steps"], cfg["schedule"], cfg["dropout"], cfg["scale_shift_norm"], cfg["warmup"],
            cfg["grad_clip"], cfg["r1_gamma"]) == (4, "vp", 0.0, True, 0, 0.0, 0.02)
    assert cfg["ch"] == 16 and cfg["lr"] == 1e-3
    G = checkpoint.build_network(checkpoint.load(full))  # KINDS["ddgan"]: the EMA generator
    assert G.latent_dim == 8 and all(torch.equal(v, ckpt["ema"][k]) for k, v in G.state_dict().items())

    # the same run, stopped by a SIGTERM after step 4 (a save at 4, exit 143), then resumed to 6: bit for bit the
    # uninterrupted run (G, its EMA, D, both optimizers, and every logged loss)
    real = train.train_step_ddgan

    def stop_after_4(step, *a, **kw):
        out = real(step, *a, **kw)
        if step == 3:  # as a SIGTERM would: the run's runs.Signals records it
            signal.getsignal(signal.SIGTERM).__self__.signum = signal.SIGTERM
        return out

    monkeypatch.setattr(train, "train_step_ddgan", stop_after_4)
    with pytest.raises(SystemExit) as e:
        train.main(DDGAN_TINY + ["--steps", "6", "--out", cut])
    assert e.value.code == 143 and load(cut)["step"] == 4
    monkeypatch.setattr(train, "train_step_ddgan", real)
    train.main(DDGAN_TINY + ["--steps", "6", "--out", cut, "--resume"])
    a, b = load(full), load(cut)
    assert b["step"] == 6
    for key in ("model", "ema", "discriminator"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for key in ("optimizer", "optimizer_d"):
        for i, state in a[key]["state"].items():
            assert all(torch.equal(v, b[key]["state"][i][k]) for k, v in state.items()), (key, i)
    assert [(r["d_loss"], r["g_loss"]) for r in metrics(cut)] == [(r["d_loss"], r["g_loss"]) for r in m]


@pytest.mark.parametrize("extra, flag", [
    (["--compile"], "--compile"),
    (["--grad-clip", "1"], "--grad-clip"),
    (["--loss", "hybrid"], "--loss"),
    (["--lazy-reg", "0"], "--lazy-reg"),
    (["--r1-gamma", "-1"], "--r1-gamma"),
    (["--lr-d", "nan"], "--lr-d"),
    (["--latent-dim", "0"], "--latent-dim"),
])
def test_ddgan_bad_input_exits_2_with_one_line(tmp_path, extra, flag):
    out = str(tmp_path / "r")
    assert_one_line_exit(forked(DDGAN_TINY + ["--steps", "1", "--out", out] + extra), 2, "error:", flag)
    assert not os.path.exists(os.path.join(out, "config.json"))  # refused before any work
