"""What the fast path relies on, checked on the CPU and, where a GPU is present, on CUDA; and what a GPU run needs of
every sampling loop and training step (one device for the network and its tensors, no value read back by the host),
checked on the meta device, which has no values at all.

The fast path (bf16 autocast, channels_last, torch.compile, a training loop that never waits for the device) is
written for CUDA, but most of what it promises is device-independent and is checked here on the CPU too: bf16
autocast exists on the CPU, so does channels_last, and a host-device synchronisation is, on any device, a tensor
read by the host (`.item()`, `bool(t)`, `.tolist()`, ...). Every test runs on "cpu" and again on "cuda" when
torch sees a GPU (skipped otherwise); the CUDA runs use CUDA's own instruments (set_sync_debug_mode) where they
exist. Tolerances were set on the CPU; the CUDA rows use the same ones.

torch.compile on the CPU: inductor's cold C++ compilation of even a tiny U-Net takes ~40 s on two cores, too long for
the suite, so the CPU runs compile with backend="aot_eager": dynamo traces the network (what breaks on a new
torch version or a new model feature) and AOTAutograd runs the traced graph, without generating kernels. On CUDA
the test compiles exactly as sample.py --compile does (inductor, CUDA graphs).
"""

import contextlib
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoint
import data
import runs
import sampling
import train
from tests import tiny
from tests.test_train import ROOT, TINY
from unet import UNet

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
NET = dict(tiny.NET, ch=32, use_scale_shift_norm=False)  # 32 channels: GroupNorm groups of one channel at the top


@pytest.fixture(autouse=True)
def full_fp32_on_cuda():
    """fp32 means fp32 here: cuDNN runs fp32 convolutions in TF32 (a 10-bit mantissa) by default, and train.py turns
    TF32 on for matmuls too, which would turn the exact comparisons below (channels_last, compiled) into 1e-3-level
    ones and blur the bf16-against-fp32 reference. Off for each test, restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def network(device, memory_format=torch.contiguous_format):
    return tiny.randomize(UNet(**NET), seed=0).to(device=device, memory_format=memory_format)


def diffusion():
    return checkpoint.build_diffusion({"schedule": "linear", "timesteps": 100})


def train_args(precision):
    args = train.build_parser().parse_args(["--precision", precision, "--warmup", "1"])
    args.task = "diffusion"
    return args


def one_training_step(device, precision, memory_format=torch.contiguous_format):
    """train.train_step once on a fixed batch: (loss, the clipped gradient as one vector)."""
    model = network(device, memory_format)
    x0 = torch.rand((8, 3, 8, 8), generator=torch.Generator().manual_seed(1)).mul(2).sub(1)
    x0 = x0.to(device).contiguous(memory_format=memory_format)
    args = train_args(precision)
    optimizer, ema = train.make_optimizer(model, args), train.EMA(model, 0.9999)
    torch.manual_seed(2)  # the step's t and eps (torch.manual_seed seeds every device)
    loss = train.train_step(0, x0, None, model, model, diffusion(), optimizer, ema, args)
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]).float().cpu()


def ddim_run(device, precision, memory_format=torch.contiguous_format, compile=False, sampler="ddim", model=None):
    """10 steps of `sampler` from a fixed x_T, as the Sampler runs it: float images in [-1, 1] and uint8 ones."""
    model = model if model is not None else network(device, memory_format).eval().requires_grad_(False)
    s = sampling.Sampler(model, diffusion(), (3, 8, 8), sampling.Settings(sampler=sampler, steps=10), device=device,
                         precision=precision, compile=compile)
    x_T = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(3)).to(device)
    with s.amp:
        x = s.loop(s.diffusion, s.model, x_T.shape, noise=x_T, generator=torch.Generator(device),
                   **s.options).float()
    images, _ = s.generate(4, batch_size=4, seed=0, show_progress=False)
    return x.cpu(), images


# -- bf16 autocast against fp32 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_step_agrees_with_fp32(device):
    """One step of Algorithm 1 under bf16 autocast: the same loss to 1% and the same gradient direction (cosine
    > 0.99) as in fp32. bf16 keeps 8 bits of mantissa (relative error 2^-9 per rounding): a wrong cast (a loss or a
    GroupNorm computed in bf16, say) shows up as percent-level disagreement."""
    loss32, grad32 = one_training_step(device, "fp32")
    loss16, grad16 = one_training_step(device, "bf16")
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    cos = torch.nn.functional.cosine_similarity(grad32, grad16, dim=0).item()
    assert cos > 0.99, cos
    assert torch.isfinite(grad16).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_sampling_agrees_with_fp32(device):
    """DDIM-10 from one x_T under bf16 autocast ends within 0.01 (mean) of the fp32 run, in data units [-1, 1]
    (measured on the CPU: 0.0017 mean, 0.025 at the 99th percentile, 0.23 at the worst pixel, where a random network's
    trajectory hinges on a clip at +-1): the sampler's arithmetic stays fp32, only the network runs in bf16."""
    x32, _ = ddim_run(device, "fp32")
    x16, _ = ddim_run(device, "bf16")
    assert (x16 - x32).abs().mean() < 0.01
    assert (x16 - x32).abs().max() < 0.5


# -- channels_last -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_is_the_same_function(device):
    """channels_last changes only how the tensors lie in memory: the same training step (loss and gradient) and the
    same DDIM images as the default layout, up to the round-off of other convolution algorithms. And the layout
    survives the network: a channels_last input gives a channels_last output."""
    loss, grad = one_training_step(device, "fp32")
    loss_cl, grad_cl = one_training_step(device, "fp32", torch.channels_last)
    assert loss_cl == pytest.approx(loss, rel=1e-4)
    torch.testing.assert_close(grad_cl, grad, rtol=1e-3, atol=1e-5)
    x, _ = ddim_run(device, "fp32")
    x_cl, _ = ddim_run(device, "fp32", torch.channels_last)
    torch.testing.assert_close(x_cl, x, rtol=1e-3, atol=1e-4)
    model = network(device, torch.channels_last)
    x_in = torch.randn(2, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    assert model(x_in, torch.tensor([5, 50], device=device)).is_contiguous(memory_format=torch.channels_last)


# -- torch.compile of the sampling network (sample.py --compile) -----------------------------------------------------

@pytest.fixture
def compile_for(monkeypatch):
    """On the CPU, torch.compile with backend="aot_eager" (see the module docstring); on CUDA as it is."""
    def use(device):
        if device == "cpu":
            real = torch.compile
            monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, **dict(kw, backend="aot_eager")))
        torch._dynamo.reset()
    yield use
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_sampling_draws_the_same_images(device, compile_for):
    """Sampler(compile=True) (sample.py --compile) draws the images the eager network draws, with every kind of loop:
    one call per step (ddim, ddpm), and loops that keep an earlier output while they call again (dpmpp2m's previous
    x_0, heun's two evaluations per step), which CUDA graphs would overwrite if the output were not copied out.
    One compiled network serves every sampler, as in evaluate.py's table; it must not recompile per sampler."""
    compile_for(device)
    eager = network(device).eval().requires_grad_(False)
    compiled = sampling.Compiled(eager, device)
    for sampler in ("ddim", "ddpm", "dpmpp2m", "heun"):
        x, images = ddim_run(device, "fp32", sampler=sampler, model=eager)
        x_c, images_c = ddim_run(device, "fp32", sampler=sampler, model=compiled, compile=True)
        torch.testing.assert_close(x_c, x, rtol=1e-3, atol=1e-3 if device == "cuda" else 1e-5)
        assert np.abs(images_c.astype(int) - images.astype(int)).max() <= 1
    s = sampling.Sampler(compiled, diffusion(), (3, 8, 8), device=device, compile=True)
    assert s.model is compiled  # an already compiled network is not wrapped twice


def test_sample_takes_compile(tmp_path, compile_for):
    """--compile reaches the Sampler from sample.py's command line: the same images as without it."""
    import sample  # noqa: PLC0415
    compile_for("cpu")
    run = tiny.write(str(tmp_path / "run"))
    images = []
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = str(tmp_path / name)
        assert tiny.run(sample, ["--checkpoint", run, "--n", "4", "--steps", "3", "--device", "cpu", "--out", out,
                                 "--no-progress", *extra]) == 0
        with np.load(out + ".npz") as f:
            images.append({k: f[k] for k in f.files})
    assert images[0].keys() == images[1].keys()
    for k in images[0]:
        np.testing.assert_array_equal(images[0][k], images[1][k])


# -- a training loop that never waits for the device -----------------------------------------------------------------

class HostReads(TorchDispatchMode):
    """Records every read of a tensor's value by the host, which on a GPU is a synchronisation: `.item()`,
    `bool(t)`, `float(t)`, `int(t)` and `if t:` all go through aten._local_scalar_dense; `.tolist()`, `.numpy()`,
    `.cpu()` and `.to("cpu")` do not reach the dispatcher for a CPU tensor, so they are recorded by wrapping them."""

    READERS = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.events, self.active = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and func is torch.ops.aten._local_scalar_dense.default:
            self.events.append(str(func))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def wrapping(self, monkeypatch):
        for name in self.READERS:
            real = getattr(torch.Tensor, name)

            def reader(t, *a, _real=real, _name=name, **k):
                if self.active:
                    self.events.append(_name)
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, reader)
        with self:
            yield self


@pytest.mark.parametrize("device", DEVICES)
def test_training_loop_reads_nothing_from_the_device_between_log_steps(tmp_path, monkeypatch, device):
    """train.py's loop, run for real: from the batch draw to the end-of-step decision (train_step, the EMA, the
    loss sum, runs.Run.end_of_step) the host reads no tensor, at any step, so on a GPU the CPU runs ahead and the device never
    idles; the loss is read every --log-every steps (and, for the bar, at steps 1, 2, 4, ... before the first log
    only, after the step's decision). Checked by recording every host read in each step's window
    (the CPU) and with CUDA's sync debug mode (on CUDA), and the same recorder sees the log steps' reads (it can fail).
    """
    steps, log_every = 12, 4
    windows, log_reads = [], {}
    mode = HostReads()
    real_next, real_end_of_step = data.Batches.next, runs.Run.end_of_step

    def close_log_window():  # what the host read after the last log step's decision (its loss, its log line)
        if mode.active and log_at is not None:
            log_reads[log_at[0]] = list(mode.events)
        mode.active = False

    def next_batch(batches):  # a step begins: x_0 ~ q(x_0)
        close_log_window()
        mode.events.clear()
        mode.active = True
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        return real_next(batches)

    def end_of_step(run):  # ... and its hot part ends with the decision what to do next
        end = real_end_of_step(run)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        mode.active = False
        windows.append((run.step, list(mode.events)))
        mode.events.clear()
        # after a log step's decision, record its reads too: the recorder must see the loss being read
        log_at[0] = run.step if run.step % log_every == 0 else None
        mode.active = log_at[0] is not None
        return end

    log_at = [None]
    monkeypatch.setattr(data.Batches, "next", next_batch)
    monkeypatch.setattr(runs.Run, "end_of_step", end_of_step)
    argv = [a if a != "cpu" else device for a in TINY] + ["--out", str(tmp_path / "run"), "--steps", str(steps),
                                                           "--log-every", str(log_every), "--save-every", "1000"]
    with warnings.catch_warnings(record=True) as caught, mode.wrapping(monkeypatch):
        warnings.simplefilter("always")
        assert tiny.run(train, argv) == 0
        close_log_window()
    assert [step for step, _ in windows] == list(range(1, steps + 1))
    assert [(step, events) for step, events in windows if events] == []
    assert not [w for w in caught if "synchroniz" in str(w.message)], [str(w.message) for w in caught]
    # the log steps do read the loss (the recorder works), and nothing else reads between them
    assert sorted(log_reads) == [4, 8, 12] and all(log_reads[s] for s in log_reads)


def test_train_compile_trains_the_same_network(tmp_path, compile_for):
    """train.py --compile (torch.compile of the network the loop runs; see the module docstring for the CPU backend):
    the same losses as the eager run step for step, a checkpoint of the plain network (no compile wrapper in its
    keys: sample.py and UNet(**model_args) load it), and --resume of a compiled run."""
    compile_for("cpu")
    argv = TINY + ["--steps", "10", "--log-every", "5"]
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = str(tmp_path / name)
        assert tiny.run(train, argv + ["--out", out, *extra]) == 0
        with open(f"{out}/metrics.jsonl") as f:
            losses[name] = [json.loads(line)["loss"] for line in f]
        ckpt = torch.load(f"{out}/ckpt.pt", weights_only=True)
        UNet(**ckpt["model_args"]).load_state_dict(ckpt["ema"])  # strict: no "_orig_mod." prefixes
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    assert tiny.run(train, TINY + ["--steps", "15", "--log-every", "5", "--out", str(tmp_path / "compiled"),
                                   "--resume", "--compile"]) == 0


@pytest.mark.parametrize("script,argv", [
    ("train.py", ["--dataset", "synthetic", "--compile", "--steps", "1"]),
    ("sample.py", ["--checkpoint", "RUN", "--compile", "--n", "1"]),
])
def test_compile_without_a_c_compiler_is_one_line_before_any_work(tmp_path, script, argv):
    """--compile on a machine without a C compiler: one line naming the flag and the fix, exit 2, before the data,
    the network or a run folder (a real process whose PATH holds no compiler)."""
    run = tiny.write(str(tmp_path / "run"))
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    env["PATH"] = str(tmp_path / "empty")  # no cc, gcc or clang
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *[run if a == "RUN" else a for a in argv],
                           "--out", out], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err, err
    assert err.startswith("error: --compile: torch.compile needs a C compiler") and "drop --compile" in err
    assert not os.path.exists(out)


def test_evaluate_compile_without_headers_is_one_line(tmp_path, monkeypatch, capsys):
    """benchmarks/fid_table.py --compile where Python's headers are missing: the same one-line refusal, naming them."""
    from benchmarks import fid_table  # noqa: PLC0415
    import sysconfig  # noqa: PLC0415
    real = sysconfig.get_paths
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: dict(real(*a, **k), include=str(tmp_path)))
    run = tiny.write(str(tmp_path / "run"))
    assert tiny.run(fid_table, ["--checkpoint", run, "--compile", "--out", str(tmp_path / "r.jsonl")]) == 2
    err = tiny.one_line_error(capsys)
    assert "--compile: torch.compile needs Python's C headers" in err and "Python.h is missing" in err


# -- every sampling loop on a device the host never reads --------------------------------------------------------------

@pytest.fixture(scope="module")
def meta_networks():
    """(eps-model, classifier, class-conditional eps-model, DDGAN generator), built on the meta device: shapes and no
    values, so they cost nothing to build. The classifier's weights keep requires_grad (guidance differentiates it
    with respect to its input)."""
    from unet import EncoderUNet  # noqa: PLC0415
    with torch.device("meta"):
        nets = (UNet(**NET), EncoderUNet(**dict(tiny.NET, out_dim=2, pool="adaptive")),
                UNet(**dict(NET, num_classes=2)), UNet(**dict(NET, latent_dim=8)))
    for i, net in enumerate(nets):
        net.eval().requires_grad_(i == 1)
    return nets


def loops():
    """(name, run(diffusion, eps_model, classifier, cfg_model, ddgan_generator) -> images) for every loop a script
    samples, edits or scores with."""
    import ddgan  # noqa: PLC0415
    import ddim  # noqa: PLC0415
    import edit  # noqa: PLC0415
    import guidance  # noqa: PLC0415
    import score  # noqa: PLC0415
    import solvers  # noqa: PLC0415
    shape = (4, 3, 8, 8)
    y = torch.tensor([0, 1, 0, 1], device="meta")

    def x_in():
        return torch.zeros(shape, device="meta")

    return [
        ("ddim", lambda d, m, c, f, g: ddim.ddim_sample_loop(d, m, shape, device="meta")),
        ("ddim eta 1", lambda d, m, c, f, g: ddim.ddim_sample_loop(d, m, shape, eta=1.0, device="meta")),
        ("ddpm", lambda d, m, c, f, g: d.p_sample_loop(m, shape, device="meta")),
        ("dpmpp2m", lambda d, m, c, f, g: solvers.dpmpp2m_sample_loop(d, m, shape, device="meta")),
        ("heun", lambda d, m, c, f, g: solvers.heun_sample_loop(d, m, shape, device="meta")),
        ("langevin", lambda d, m, c, f, g: score.langevin_sample_loop(d, m, shape, device="meta")),
        ("pc", lambda d, m, c, f, g: score.pc_sample_loop(d, m, shape, device="meta")),
        # an unconditional eps-model guided by a classifier: the labels are the classifier's (sampling.IgnoreLabels)
        ("ddim + classifier guidance", lambda d, m, c, f, g: ddim.ddim_sample_loop(
            d, sampling.IgnoreLabels(m), shape, cond_fn=guidance.classifier_cond_fn(c, 4.0), model_kwargs={"y": y},
            device="meta")),
        ("ddpm + classifier guidance", lambda d, m, c, f, g: d.p_sample_loop(
            sampling.IgnoreLabels(m), shape, cond_fn=guidance.classifier_cond_fn(c, 4.0), model_kwargs={"y": y},
            device="meta")),
        ("ddim + classifier-free guidance", lambda d, m, c, f, g: ddim.ddim_sample_loop(
            d, guidance.ClassifierFreeGuidance(f, 3.0, null_class=2), shape, model_kwargs={"y": y}, device="meta")),
        ("ddgan", lambda d, m, c, f, g: ddgan.ddgan_sample_loop(ddgan_diffusion(), g, shape, latent_dim=8,
                                                              device="meta")),
        ("sdedit ddpm", lambda d, m, c, f, g: edit.sdedit(d, m, x_in(), 0.5)),
        # the mask as sample.py gives it: read from an image file, on the host
        ("sdedit ddim, masked", lambda d, m, c, f, g: edit.sdedit(d, m, x_in(), 0.5, sampler="ddim",
                                                                   mask=torch.ones(shape))),
        ("ddim inversion", lambda d, m, c, f, g: ddim.ddim_invert(d, m, x_in())),
        ("bits/dim", lambda d, m, c, f, g: d.calc_bpd_loop(m, x_in())["total_bpd"]),
    ]


def ddgan_diffusion():
    """DDGAN's chain: T = 4 steps of the vp schedule (ddgan.py)."""
    return checkpoint.build_diffusion({"schedule": "vp", "timesteps": 4})


@pytest.mark.parametrize("name", [name for name, _ in loops()])
def test_every_loop_runs_on_another_device_and_never_reads_it(name, meta_networks):
    """What a GPU run needs of every loop, checked without one: the network and the images on another device than
    the host's float64 schedule, and no value of theirs read back by the host (one sync per step on a GPU). On the
    meta device there are no values: any read (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`) raises, and so does a
    CPU tensor of more than one element meeting a device tensor (a schedule gathered without `.to(device)`)."""
    out = dict(loops())[name](diffusion().respace(5), *meta_networks)
    assert out.device.type == "meta"


# the training paths: (name, train.py flags)
TRAINING = [("L_simple", []), ("hybrid loss, cosine schedule", ["--loss", "hybrid", "--schedule", "cosine"]),
            ("importance-sampled t", ["--loss", "hybrid", "--t-sampler", "importance"]),
            ("class-conditional (CFG)", ["--class-cond"]), ("noisy classifier", ["--task", "classifier"]),
            ("DDGAN, with R1", ["--task", "ddgan"])]


@pytest.mark.parametrize("name", [name for name, _ in TRAINING])
def test_every_training_step_runs_on_another_device_and_never_reads_it(name):
    """train.py's step for every task and loss, as its loop calls it (fused AdamW, clipping, the EMA; DDGAN's two
    players and R1's double backward), on the meta device: no CPU tensor meets a device one, nothing is read back.
    The loop's own reads (log steps only) are tests/test_fast_path.py's HostReads test."""
    import ddpm  # noqa: PLC0415
    from unet import EncoderUNet  # noqa: PLC0415
    argv = dict(TRAINING)[name] + ["--image-size", "8", "--ch", "16", "--ch-mult", "1,2", "--num-res-blocks", "1",
                                   "--attn", "4", "--d-ch", "8", "--latent-dim", "8"]
    args = train.build_parser().parse_args(argv)
    if args.task == "ddgan":  # the recipe's T = 4 and vp schedule, as train.py fills them in
        import recipes  # noqa: PLC0415
        for key in ("diffusion_steps", "schedule"):
            setattr(args, key, recipes.DDGAN_CIFAR10[key])
    args.num_classes = 2
    kind, model_args = train.build_model_args(args, 2, 3)
    diffusion = checkpoint.build_diffusion(train.diffusion_args_of(args))
    with torch.device("meta"):
        model = checkpoint.KINDS[kind](**model_args)
        disc = EncoderUNet(**runs.discriminator_args_of(args, 3)) if args.task == "ddgan" else None
    x0 = torch.zeros(4, 3, 8, 8, device="meta")
    y = torch.zeros(4, dtype=torch.long, device="meta")
    optimizer, ema = train.make_optimizer(model, args), train.EMA(model, args.ema)
    for step in range(2):
        if args.task == "ddgan":
            opt_d = train.make_optimizer(disc, args, lr=args.lr_d)
            out = train.train_step_ddgan(step, x0, model, disc, diffusion, optimizer, opt_d, ema, args)
        else:
            sampler = ddpm.ImportanceSampler(diffusion.num_timesteps, device="meta") \
                if args.t_sampler == "importance" else None
            out = train.train_step(step, x0, y, model, model, diffusion, optimizer, ema, args, sampler)
        assert out.device.type == "meta"
