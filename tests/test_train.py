"""train.py end to end on a tiny U-Net and a tiny synthetic dataset (CPU, fp32). sample.py: tests/test_sample.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--synthetic-n", "64", "--image-size", "8", "--ch", "16", "--ch-mult", "1,2",
        "--num-res-blocks", "1", "--attn", "4", "--batch-size", "8", "--diffusion-steps", "100", "--warmup", "5",
        "--log-every", "5", "--save-every", "10", "--sample-every", "0", "--no-progress", "--device", "cpu"]


def run_cli(script, *args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_falls(tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + ["--steps", "200", "--lr", "1e-3", "--log-every", "40", "--save-every", "200",
                       "--out", out, "--dropout", "0"])
    m = metrics(out)
    # L_simple starts near 1 (a zero-initialised output predicts eps = 0) and must fall well below it
    assert m[0]["loss"] > 0.5 and m[-1]["loss"] < 0.6 * m[0]["loss"], [r["loss"] for r in m]
    assert {"step", "loss", "lr", "img_per_s"} <= set(m[-1])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 200 and ckpt["config"]["ch"] == 16


def test_kill_then_resume_equals_uninterrupted(tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    args = TINY + ["--steps", "30", "--sample-every", "0"]
    train.main(args + ["--out", full])
    # start the same run in a subprocess and SIGKILL it once its first checkpoint (step 10) exists
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--out", killed], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(killed, "ckpt.pt")
    deadline = time.time() + 120
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(ckpt, weights_only=True)  # whatever moment the kill hit, the file on disk is whole
    assert saved["step"] in (10, 20, 30)
    train.main(args + ["--out", killed, "--resume"])
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["step"] == b["step"] == 30
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert metrics(full)[-1]["loss"] == metrics(killed)[-1]["loss"]


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "nan")
    real = train.build_diffusion
    calls = {"n": 0}

    def poisoned(cfg, var_type=None):
        d = real(cfg, var_type)
        losses = d.training_losses

        def training_losses(*a, **k):
            calls["n"] += 1
            terms = losses(*a, **k)
            if calls["n"] > 13:  # steps 14.. produce NaN: after the checkpoint of step 10
                terms["loss"] = terms["loss"] * float("nan")
            return terms
        d.training_losses = training_losses
        return d

    monkeypatch.setattr(train, "build_diffusion", poisoned)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--steps", "40", "--out", out])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nan" in err[0] and "checkpoint" in err[0], err
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def one_line_exit_2(fn, argv, capsys, flag):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], lines


@pytest.mark.parametrize("extra,flag", [
    (["--dataset", "imagenet"], "--dataset"),
    (["--batch-size", "0"], "--batch-size"),
    (["--ch-mult", "1,x"], "--ch-mult"),
    (["--data-dir", "/nonexistent/cifar"], "--data-dir"),
    (["--out", "/proc/forbidden/run"], "--out"),
])
def test_bad_training_input_exits_2_with_one_line(tmp_path, capsys, extra, flag):
    args = [a for a in TINY]
    if "--data-dir" in extra:
        args[args.index("synthetic")] = "cifar10"
        args[args.index("--image-size") + 1] = "32"
    one_line_exit_2(train.main, args + ["--steps", "1", "--out", str(tmp_path / "r")] + extra, capsys, flag)


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    for script, args in [("train.py", TINY + ["--out", "/proc/forbidden/run"])]:
        r = run_cli(script, *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_resume_checks(tmp_path, capsys):
    out = str(tmp_path / "r")
    train.main(TINY + ["--steps", "10", "--out", out])
    for extra, flag in [([], "--out"), (["--resume", "--ch", "32"], "--ch"), (["--resume", "--loss", "hybrid"], "--loss")]:
        with pytest.raises(SystemExit) as e:
            train.main(TINY + ["--steps", "20", "--out", out] + extra)
        assert e.value.code == 2
        assert flag in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(TINY + ["--steps", "20", "--out", str(tmp_path / "new"), "--resume"])
    assert "--resume" in capsys.readouterr().err


def test_batch_not_divisible_by_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "setup_distributed", lambda args: (0, 3, torch.device("cpu")))
    with pytest.raises(train.UsageError, match="--batch-size"):
        train.train(train.build_parser().parse_args(TINY + ["--out", str(tmp_path / "r")]))


def test_hybrid_and_importance_sampling_train(tmp_path):
    out = str(tmp_path / "h")
    train.main(TINY + ["--steps", "20", "--loss", "hybrid", "--t-sampler", "importance", "--schedule", "cosine",
                       "--class-cond", "--out", out, "--sample-every", "20", "--n-sample", "4"])
    assert os.path.exists(os.path.join(out, "samples.png"))
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["t_sampler"]["counts"].sum().item() == 20 * 8
    model = checkpoint.build_network(checkpoint.load(out))
    assert model.out_channels == 6 and model.num_classes == 2


def test_ddp_two_processes_hold_identical_weights(tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        os.path.join(ROOT, "tests", "ddp_worker.py"), *TINY, "--steps", "6", "--out", out],
                       capture_output=True, text=True, timeout=170, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(os.path.join(out, "rank0.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "rank1.pt"), weights_only=True)
    init = train.build_model(torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"], 2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a), "the weights moved"


def test_classifier_task(tmp_path, capsys):
    clf = str(tmp_path / "clf")
    train.main(TINY + ["--task", "classifier", "--steps", "40", "--lr", "1e-3", "--eval-every", "40", "--out", clf])
    assert "test accuracy at noise level t=0:" in capsys.readouterr().out
    last = metrics(clf)[-1]
    # the two synthetic classes are easy at t = 0; accuracy is logged at T/4-spaced noise levels
    assert last["acc_t0"] > 0.9 and {"acc_t25", "acc_t50", "acc_t75"} <= set(last), last


def test_save_minutes_checkpoints_a_slow_run(tmp_path, monkeypatch):
    out = str(tmp_path / "slow")
    clock = {"t": 0.0}

    def fake_clock():  # every call advances 20 s: the run looks slow
        clock["t"] += 20.0
        return clock["t"]
    saved_steps = []
    real_save = train.atomic_save
    monkeypatch.setattr(train.time, "perf_counter", fake_clock)
    monkeypatch.setattr(train, "atomic_save", lambda obj, path: (saved_steps.append(obj["step"]), real_save(obj, path)))
    train.main(TINY + ["--steps", "6", "--save-every", "1000", "--log-every", "1000", "--save-minutes", "1",
                       "--out", out])
    # no --save-every or --log-every step comes before step 6, yet the clock checkpointed the run on the way
    assert saved_steps[-1] == 6 and len(saved_steps) >= 2 and saved_steps[0] < 6, saved_steps
