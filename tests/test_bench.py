"""benchmarks/bench.py: the tiny CPU run end to end, the FLOP counts it relies on, its command-line errors.

The peers (diffusers, denoising_diffusion_pytorch) are optional: their test runs only where both are installed.
"""

import gzip
import importlib.util
import json
import math
import os
import statistics

import pytest
import torch
from torch import nn

from benchmarks import bench

TINY = ["--tiny", "--device", "cpu"]


def rows_by(results, task):
    return [r for r in results["rows"] if r["task"] == task]


def test_tiny_run_prints_and_returns_positive_throughput(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(TINY + ["--peers", "none", "--json", str(out)])
    said = capsys.readouterr()
    table = said.out

    train_rows, sample_rows = rows_by(results, "train"), rows_by(results, "sample")
    # CPU: eager only (no compile row by default), this repository only (--peers none)
    assert [r["impl"] for r in train_rows] == ["this repo (eager)"]
    assert [r["impl"] for r in sample_rows] == ["this repo (eager)"]
    for r in train_rows + sample_rows:
        assert r["status"] == "ok", r["status"]
        assert r["img_per_s"] > 0 and math.isfinite(r["img_per_s"])
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])  # --tiny: 2 repeats
        assert r["ratio"] == pytest.approx(1.0)                            # the baseline of its own task
        assert 0 < r["of_ceiling"] and r["tflops"] > 0
        assert r.get("mfu") is None                                        # a CPU has no datasheet peak here
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

    assert f"wrote {out}" in said.err
    saved = json.loads(out.read_text())
    assert [r["impl"] for r in saved["rows"]] == [r["impl"] for r in results["rows"]]
    assert saved["meta"]["args"]["batch_size"] == 4 and saved["meta"]["peak_tflops"] > 0
    assert saved["meta"]["matmul_n"] == 1024 and saved["meta"]["formats"] == ["contiguous"]
    assert "matmul" in saved["meta"]["ceiling"] and "convolution" in saved["meta"]["ceiling"]


def test_conv_peak_counts_the_convolution_by_hand(monkeypatch):
    """conv_peak's FLOPs are FlopCounterMode's count of the same convolution; its time is the best repeat's."""
    monkeypatch.setattr(bench, "timed_repeats", lambda fn, device, warmup, repeats, calls: [2.0, 1.0, 3.0])
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False)
    x = torch.randn(2, 256, 32, 32)
    assert bench.conv_peak(torch.device("cpu"), torch.float32, 2, 5) == bench.count_flops(lambda: conv(x)) * 5 / 1.0


def test_rows_are_timed_interleaved_after_every_warm_up(monkeypatch):
    """All rows are set up and warmed up before the first timed repeat; then round k times every row once, starting
    one row later than round k - 1 (a, b, c / b, c, a / c, a, b). Three rows of this repo without a peer: the
    baseline format, the other format and the compiled step."""
    log = []

    def fake_runner(impl, cfg, args, device, fmt, compiled=False):
        key = "compile" if compiled else fmt
        log.append(("setup", key))
        runner = bench.Runner(lambda: log.append(("call", key)), 2, 10, lambda: log.append(("warmup", key)),
                              lambda: {"params": 1, "syncs": None}, profile_calls=1)
        return runner

    monkeypatch.setattr(bench, "train_runner", fake_runner)
    monkeypatch.setattr(bench.cli, "check_compiler", lambda: None)
    results = bench.main(TINY + ["--peers", "none", "--tasks", "train", "--compile", "--repeats", "3",
                                 "--formats", "channels_last,contiguous"])
    rows = rows_by(results, "train")
    assert [r["impl"] for r in rows] == ["this repo (eager, channels_last)", "this repo (eager, contiguous)",
                                         "this repo (torch.compile)"]
    assert all(r["status"] == "ok" and len(r["times_s"]) == 3 for r in rows)
    keys = ["channels_last", "contiguous", "compile"]
    assert log[:6] == [(what, k) for k in keys for what in ("setup", "warmup")]
    calls = [k for what, k in log[6:]]
    assert all(what == "call" for what, _ in log[6:])
    rounds = [keys, keys[1:] + keys[:1], keys[2:] + keys[:2]]
    assert calls == [k for rnd in rounds for k in rnd for _ in range(2)]  # 2 calls per repeat
    assert not rows_by(results, "sample")  # --tasks train


def test_a_row_failing_mid_run_stops_alone(monkeypatch):
    """A row whose repeat raises gets an error status; the other rows keep their rounds."""
    def fake_runner(impl, cfg, args, device, fmt, compiled=False):
        def call():
            if fmt == "contiguous":
                raise RuntimeError("out of memory (pretend)")
        return bench.Runner(call, 1, 4, lambda: None, lambda: {"params": 1, "syncs": None}, profile_calls=1)

    monkeypatch.setattr(bench, "train_runner", fake_runner)
    results = bench.main(TINY + ["--peers", "none", "--tasks", "train", "--repeats", "3",
                                 "--formats", "channels_last,contiguous"])
    ok, failed = rows_by(results, "train")
    assert ok["status"] == "ok" and len(ok["times_s"]) == 3
    assert failed["status"] == "error: RuntimeError: out of memory (pretend)"


def test_no_compiler_leaves_the_default_compile_rows_saying_why(monkeypatch):
    """Where torch.compile cannot build (no C compiler or no Python.h), the compile rows that run by default (on CUDA)
    say why and the other rows still run; asked for by name (--compile), it is one line and exit 2 before any work."""
    def missing():
        raise bench.UsageError("--compile: torch.compile needs a C compiler and none is on PATH (...)")

    monkeypatch.setattr(bench.cli, "check_compiler", missing)
    monkeypatch.setattr(bench, "default_compile", lambda device: True)  # as on CUDA
    results = bench.main(TINY + ["--peers", "none", "--repeats", "1", "--sample-n", "4", "--sample-steps", "2"])
    for task in ("train", "sample"):
        eager, compiled = rows_by(results, task)
        assert eager["status"] == "ok"
        assert compiled["impl"] == "this repo (torch.compile)"
        assert compiled["status"].startswith("not run (--compile: torch.compile needs a C compiler")
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + ["--compile"])
    assert e.value.code == 2


def test_sampling_warms_up_every_batch_size_and_compiles_with_sample_pys_wrapper(monkeypatch):
    """The compiled sampling row is sample.py --compile's network (sampling.Compiled), and each batch size a timed
    repeat uses is drawn once before timing (10 images in batches of 4: sizes 4 and 2), so nothing compiles while
    timed."""
    wrapped, shapes = [], []
    real_compiled, real_loop = bench.sampling.Compiled, bench.ddim_sample_loop

    class Recording(real_compiled):
        def __init__(self, model, device):
            wrapped.append(model)
            super().__init__(model, device)

    def loop(diffusion, model, shape, **kw):
        shapes.append((type(model).__name__, shape[0]))
        return real_loop(diffusion, model, shape, **kw)

    # what torch.compile does is tests/test_fast_path.py's business; here only that bench wires it as sample.py does
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)
    monkeypatch.setattr(bench.sampling, "Compiled", Recording)
    monkeypatch.setattr(bench, "ddim_sample_loop", loop)
    monkeypatch.setattr(bench.cli, "check_compiler", lambda: None)
    results = bench.main(TINY + ["--peers", "none", "--tasks", "sample", "--compile", "--repeats", "1",
                                 "--sample-n", "10", "--sample-batch", "4", "--sample-steps", "2"])
    eager, compiled = rows_by(results, "sample")
    assert compiled["impl"] == "this repo (torch.compile)" and compiled["status"] == "ok"
    assert len(wrapped) == 1
    compiled_calls = [n for name, n in shapes if name == "Recording"]
    # warm-up: one draw per distinct size; then one timed repeat: 4, 4, 2; then the sync count's draw (CPU: none)
    assert compiled_calls == [4, 2, 4, 4, 2]
    assert eager["img_per_s"] > 0 and compiled["img_per_s"] > 0


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


@pytest.mark.parametrize("packed", [False, True])
def test_commit_is_read_in_a_worktree(tmp_path, monkeypatch, packed):
    """In a `git worktree`, .git is a file naming the tree's git folder, whose HEAD names a branch whose ref lives
    in the common folder (loose, or in packed-refs)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    common = tmp_path / "main" / ".git"
    gitdir = common / "worktrees" / "wt"
    gitdir.mkdir(parents=True)
    (gitdir / "HEAD").write_text("ref: refs/heads/bench\n")
    (gitdir / "commondir").write_text("../..\n")
    if packed:
        (common / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha} refs/heads/bench\n")
    else:
        (common / "refs" / "heads").mkdir(parents=True)
        (common / "refs" / "heads" / "bench").write_text(sha + "\n")
    tree = tmp_path / "wt"
    tree.mkdir()
    (tree / ".git").write_text(f"gitdir: {gitdir}\n")
    monkeypatch.setattr(bench, "ROOT", str(tree))
    assert bench.git_commit() == sha[:12]


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4),   # H100 SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_datasheet_peak_by_device_name(name, tflops):
    assert bench.datasheet_tflops(name) == tflops


def test_mfu_is_over_the_given_peak_and_beside_the_measured_ceiling(capsys):
    results = bench.main(TINY + ["--peers", "none", "--sample-n", "0", "--repeats", "1", "--peak-tflops", "0.5"])
    row = rows_by(results, "train")[0]
    assert row["mfu"] == pytest.approx(row["tflops"] / 0.5)
    assert row["of_ceiling"] == pytest.approx(row["tflops"] / results["meta"]["peak_tflops"])
    assert results["meta"]["datasheet_source"] == "--peak-tflops"
    assert "datasheet dense bf16 peak 0.5 TFLOP/s (--peak-tflops)" in capsys.readouterr().out


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816dgrad_optimized_bf16_128x128_32x5_nhwc>",
     "convolution"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false>",
     "copy / layout / cast"),
    ("void at::native::elementwise_kernel<128, 2, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>",
     "copy / layout / cast"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>(long, float, ...)",
     "normalization"),
    ("aten::native_group_norm_backward", "normalization"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false>>", "attention"),
    ("void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float, 4>>", "optimizer / EMA"),
    ("triton_poi_fused_convolution_native_group_norm_silu_3", "compiled (inductor)"),
    ("## Call CompiledFxGraph fgdrzsbvwj36kvzrec543vkwnynmbti3i7i7myqlixl2ws7wnist ##", "compiled (inductor)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
     "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t>>",
     "reduction"),
    ("aten::empty", "other"),
])
def test_profile_categories_of_kernel_names(name, category):
    assert bench.category_of(name) == category


def test_profile_writes_traces_and_says_where_the_time_goes(tmp_path, capsys):
    folder = tmp_path / "prof"
    results = bench.main(TINY + ["--peers", "none", "--repeats", "1", "--profile", str(folder)])
    table = capsys.readouterr().out
    for task in ("train", "sample"):
        p = rows_by(results, task)[0]["profile"]
        assert p["status"] == "ok" and os.path.isfile(p["trace"]) and p["trace"].endswith(".json.gz")
        with gzip.open(p["trace"]) as f:
            assert json.load(f)["traceEvents"]
        assert sum(share for _, _, share in p["categories"]) == pytest.approx(1.0)
        cats = {cat: ms for cat, ms, _ in p["categories"]}
        assert cats["convolution"] == max(cats.values())  # a U-Net's time is in its convolutions
        assert len(p["top"]) == 15 and p["launches_per_call"] > 100 and 0 < p["busy_ms_per_call"]
        assert f"#### Profile: {task}, this repo (eager)" in table
    assert "| convolution |" in table and "`aten::mkldnn_convolution`" in table


@pytest.mark.parametrize("argv, flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--repeats", "-1"], "--repeats"),
    (["--sample-n", "-5"], "--sample-n"),
    (["--sample-steps", "2000"], "--sample-steps"),
    (["--peers", "everyone"], "--peers"),
    (["--json", "/no/such/folder/bench.json"], "--json"),
    (["--device", "tpu9"], "--device"),
    (["--formats", "nhwc"], "--formats"),
    (["--formats", "contiguous,contiguous"], "--formats"),
    (["--tasks", ""], "--tasks"),
    (["--peak-tflops", "0"], "--peak-tflops"),
    (["--profile", "/no/such/folder/prof"], "--profile"),
    (["--steps-per-repeat", "many"], "--steps-per-repeat"),
])
def test_bad_input_is_one_line_and_exit_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and flag in err, err


def test_earlier_results_are_never_replaced_without_force(tmp_path, capsys):
    """An existing --json file, or a --profile folder with files in it: one line naming the flag, exit 2, the file
    untouched; --force replaces them."""
    old = tmp_path / "bench.json"
    old.write_text("earlier numbers")
    prof = tmp_path / "prof"
    prof.mkdir()
    (prof / "train_ours.json.gz").write_text("earlier trace")
    for argv, flag in ((["--json", str(old)], "--json"), (["--profile", str(prof)], "--profile")):
        with pytest.raises(SystemExit) as e:
            bench.main(TINY + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag}: ") and "--force" in err and "\n" not in err, err
    assert old.read_text() == "earlier numbers" and (prof / "train_ours.json.gz").read_text() == "earlier trace"
    bench.main(TINY + ["--peers", "none", "--sample-n", "0", "--repeats", "1", "--json", str(old), "--force"])
    assert json.loads(old.read_text())["rows"]


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
