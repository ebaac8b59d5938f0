"""bench.py: the tiny CPU run end to end, the FLOP counts it relies on, its command-line errors.

The peers (diffusers, denoising_diffusion_pytorch) are optional: their test runs only where both are installed.
"""

import importlib.util
import json
import math
import statistics

import pytest
import torch
from torch import nn

import bench

TINY = ["--tiny", "--device", "cpu"]


def rows_by(results, task):
    return [r for r in results["rows"] if r["task"] == task]


def test_tiny_run_prints_and_returns_positive_throughput(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(TINY + ["--peers", "none", "--json", str(out)])
    table = capsys.readouterr().out

    train_rows, sample_rows = rows_by(results, "train"), rows_by(results, "sample")
    # CPU: eager only (no compile row by default), this repository only (--peers none)
    assert [r["impl"] for r in train_rows] == ["this repo (eager)"]
    assert [r["impl"] for r in sample_rows] == ["this repo (eager)"]
    for r in train_rows + sample_rows:
        assert r["status"] == "ok", r["status"]
        assert r["img_per_s"] > 0 and math.isfinite(r["img_per_s"])
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])  # --tiny: 2 repeats
        assert r["ratio"] == pytest.approx(1.0)                            # the baseline of its own task
        assert 0 < r["mfu"] and r["tflops"] > 0
        assert r["syncs"] is None                                          # counted on CUDA only
    fwd, step = results["flops"]["ours"]["forward"], results["flops"]["ours"]["train_step"]
    assert 0 < fwd < step
    # img/s is the median repeat's: batch 4 x 2 steps per repeat; 8 images per sampling repeat
    assert train_rows[0]["img_per_s"] == pytest.approx(4 * 2 / statistics.median(train_rows[0]["times_s"]))
    assert sample_rows[0]["img_per_s"] == pytest.approx(8 / statistics.median(sample_rows[0]["times_s"]))

    # the markdown table, ready to paste: header, separator, one line per row
    assert "| task | implementation |" in table and "| --- |" in table
    assert table.count("| train (batch 4) | this repo (eager) |") == 1
    assert table.count("| sample (DDIM 5) | this repo (eager) |") == 1
    assert f"torch {torch.__version__}" in table

    saved = json.loads(out.read_text())
    assert [r["impl"] for r in saved["rows"]] == [r["impl"] for r in results["rows"]]
    assert saved["meta"]["args"]["batch_size"] == 4 and saved["meta"]["peak_tflops"] > 0


def test_missing_peer_gets_an_install_row(monkeypatch, capsys):
    def absent():
        raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")

    monkeypatch.setattr(bench, "import_diffusers", absent)
    results = bench.main(TINY + ["--peers", "diffusers", "--sample-n", "0", "--repeats", "1", "--warmup", "0"])
    table = capsys.readouterr().out
    peer = [r for r in results["rows"] if r["key"] == "diffusers"]
    assert len(peer) == 1 and peer[0]["task"] == "train"   # --sample-n 0: no sampling rows at all
    assert peer[0]["status"].startswith("not installed (pip install diffusers==")
    assert "not installed (pip install diffusers==" in table
    assert rows_by(results, "train")[0]["status"] == "ok"  # our row still ran


def test_a_failing_row_is_reported_not_raised():
    row = bench.guarded(lambda: {"img_per_s": 1 / 0})
    assert row["status"].startswith("error: ZeroDivisionError")


@pytest.mark.parametrize("n, cin, cout, k, stride, size",
                         [(2, 3, 8, 3, 1, 8), (1, 16, 4, 3, 2, 10), (3, 5, 7, 1, 1, 6)])
def test_counter_counts_a_conv_as_two_flops_per_multiply_add(n, cin, cout, k, stride, size):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    x = torch.randn(n, cin, size, size)
    out = conv(x)
    h, w = out.shape[-2:]
    assert bench.count_flops(lambda: conv(x)) == 2 * cin * cout * k * k * h * w * n


def test_counter_counts_a_linear_layer_by_hand():
    lin = nn.Linear(24, 10)
    x = torch.randn(5, 24)
    assert bench.count_flops(lambda: lin(x)) == 2 * 24 * 10 * 5


def test_default_unet_flops_per_image():
    """The DDPM CIFAR-10 U-Net (35.7M): 12.44 GFLOP forward per 32x32 image, 37.32 GFLOP forward + backward.

    Counted on the meta device: shapes only, so the full network counts in about a second on a CPU.
    """
    fwd, step = bench.network_flops("ours", bench.our_config(tiny=False))
    assert fwd == pytest.approx(12.44e9, rel=0.01)
    assert step == pytest.approx(37.3e9, rel=0.01)
    # backward costs about twice the forward (minus the input gradient of the first conv, which is not needed)
    assert step == pytest.approx(3 * fwd, rel=0.01)


def test_timed_repeats_calls_warmup_then_repeats():
    calls = []
    times = bench.timed_repeats(lambda: calls.append(1), torch.device("cpu"), warmup=3, repeats=4, calls=5)
    assert len(calls) == 3 + 4 * 5 and len(times) == 4 and all(t >= 0 for t in times)


def test_commit_is_read_without_git():
    commit = bench.git_commit()
    assert commit is None or (len(commit) == 12 and all(c in "0123456789abcdef" for c in commit))


@pytest.mark.parametrize("argv, flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--repeats", "-1"], "--repeats"),
    (["--sample-n", "-5"], "--sample-n"),
    (["--sample-steps", "2000"], "--sample-steps"),
    (["--peers", "everyone"], "--peers"),
    (["--json", "/no/such/folder/bench.json"], "--json"),
    (["--device", "tpu9"], "--device"),
    (["--steps-per-repeat", "many"], "--steps-per-repeat"),
])
def test_bad_input_is_one_line_and_exit_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and flag in err, err


PEERS_INSTALLED = all(importlib.util.find_spec(m) is not None for m in ("diffusers", "denoising_diffusion_pytorch"))


@pytest.mark.skipif(not PEERS_INSTALLED, reason="diffusers and denoising_diffusion_pytorch are optional "
                    "(pip install diffusers==0.42.1 denoising-diffusion-pytorch==2.3.4)")
def test_tiny_run_with_the_peers():
    results = bench.main(TINY + ["--peers", "all", "--sample-n", "2", "--sample-batch", "2", "--sample-steps", "2"])
    assert {r["key"] for r in results["rows"]} == {"ours", "diffusers", "lucidrains"}
    for r in results["rows"]:
        assert r["status"] == "ok", (r["impl"], r["status"])
        assert r["img_per_s"] > 0 and r["params"] > 0 and r["flops"][0] > 0
    # diffusers configured as google/ddpm-cifar10-32 is the same network as ours: same size, same FLOPs
    ours, diff = results["flops"]["ours"], results["flops"]["diffusers"]
    assert ours == diff


def test_our_training_row_times_train_py_own_step(monkeypatch):
    """The benchmark measures the real step: train.train_step, called once per timed step (not a copy of it)."""
    import train
    calls = []
    real = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    results = bench.main(TINY + ["--peers", "none", "--sample-n", "0", "--repeats", "1", "--steps-per-repeat", "2",
                                 "--warmup", "1"])
    assert rows_by(results, "train")[0]["status"] == "ok"
    assert calls == [0, 1, 2]  # 1 warm-up step, then 1 repeat of 2 timed steps, numbered as train.py numbers them


def test_the_peer_harness_trains_with_train_pys_optimizer_and_ema():
    """peer_training_step (the loop the peers run in) on a stand-in network: it steps AdamW at train.py's warm-up
    learning rate and keeps train.py's EMA."""
    import train
    cfg = bench.our_config(tiny=True)
    args = bench.resolve_args(bench.build_parser().parse_args(TINY))
    model = nn.Conv2d(3, 3, 1)
    before = model.weight.detach().clone()
    step = bench.peer_training_step(model, lambda x0: (model(x0) - x0).square().mean(), cfg, args,
                                    torch.device("cpu"))
    for _ in range(3):
        step()
    assert not torch.equal(model.weight, before) and math.isfinite(float(step.loss_sum()))
    assert step.optimizer.param_groups[0]["lr"] == train.get_lr(2, cfg) and step.ema.updates == 3
    assert not torch.equal(step.ema.module.weight, model.weight)  # an average, not a copy
