"""
A sampler name, its settings and guidance, on a checkpoint's network, turned into images: the same way for every
script (sample.py, evaluate.py, figures.py, benchmarks/).

    ckpt = checkpoint.load("runs/cifar10")
    s = sampling.from_checkpoint(ckpt, sampling.Settings(sampler="ddim", steps=50), device="cpu")
    batches = s.batches(n=64, batch_size=256, seed=0)
    for b in batches:   # the chosen loop on every step of the respaced diffusion (D4)
        b.x0 = s.loop(s.diffusion, batches.model, b.x_T.shape, noise=b.x_T, model_kwargs=b.model_kwargs,
                      generator=b.generator, **s.options)
    images, labels = batches.images()                               # uint8 [64, 32, 32, 3], None

THE MENU (menu.py: SAMPLERS, Settings and their flags, imported here) has one written-out entry per sampler. The
Sampler respaces the checkpoint's diffusion ONCE, to --steps with --skip (DDIM §4.2, D4), and the loop walks all of
its steps. Every setting is checked first (menu.SettingChecks), before any work.

GUIDANCE (guidance.py) wraps the network or adds a cond_fn; the loops never know which: classifier guidance (ADM,
G1-G3) is cond_fn = s grad_x log p_phi(y | x_t); classifier-free guidance (G5) is eps~ = (1 + w) eps(x_t, y) - w eps(x_t).

BATCHES AND SEEDS (batches.py): batch i draws from its own generator (seed, i); under torchrun the ranks share the
batches. Writing the images: outputs.save_samples.
"""

import torch
import torch.nn as nn

import checkpoint
from batches import Batches
from cli import UsageError, autocast, say
from ddpm import GaussianDiffusion
from guidance import ClassifierFreeGuidance, classifier_cond_fn
from menu import (SAMPLERS, SETTINGS, STEP_SCHEDULES, VARIANCE_FLAGS, Entry, SettingChecks, Settings,  # noqa: F401
                  add_arguments, settings_from_args)


# ----------------------------------------------------------------------------------------------------------------
# Wrappers around the network
# ----------------------------------------------------------------------------------------------------------------

class IgnoreLabels(nn.Module):
    """An unconditional network under classifier guidance: the labels in model_kwargs are the cond_fn's, not its."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y=None, **kwargs):
        return self.model(x, t, **kwargs)


class Compiled(nn.Module):
    """The network under torch.compile, for sampling (--compile): the same function in fewer, fused kernels.

    A sampler calls the network with the same shapes at every step, which is what compilation wants: dynamic=False
    compiles one graph per batch shape (a call's last, smaller batch gets its own), the first call of each shape
    paying the compilation (tens of seconds). On CUDA the mode is "reduce-overhead", which also records the compiled
    network as a CUDA graph and replays it: one launch per call instead of one per kernel, what a sampling step at a
    small batch is bound by. A replay writes its output into the same memory every time, so each call's output is
    copied out before the next call can overwrite it (the loops keep a step's output while they call again: Heun's
    second evaluation, DPM-Solver++'s previous x_0). The weights must not change once compiled (they are the EMA's).
    """

    def __init__(self, model, device):
        super().__init__()
        self.cuda_graphs = torch.device(device).type == "cuda"
        self.net = torch.compile(model, mode="reduce-overhead" if self.cuda_graphs else None, dynamic=False)

    def forward(self, x, t, **kwargs):
        if not self.cuda_graphs:
            return self.net(x, t, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last replay's output has been copied out
        return self.net(x, t, **kwargs).clone()


# ----------------------------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------------------------

class Sampler(SettingChecks):
    """A checkpoint's network, its respaced diffusion, the guidance and the settings: what a loop needs.

    model:       the eps-network (UNet) in eval mode; num_classes: its classes (None: unconditional).
    diffusion:   the diffusion it was trained with (checkpoint.build_diffusion); respaced here to settings.steps.
    image_shape: (C, H, W) of one image.
    classifier:  a noisy classifier (EncoderUNet) for classifier guidance, or None; classifier_classes: its classes.
    Every setting is checked first (UsageError naming the flag), before any work. After that, `loop`, `diffusion`,
    `model` and `options` are exactly what the chosen sampler is called with.
    """

    def __init__(self, model, diffusion, image_shape, settings=Settings(), num_classes=None, classifier=None,
                 classifier_classes=None, device="cpu", precision="auto", compile=False):
        self.settings, self.image_shape, self.num_classes = settings, tuple(image_shape), num_classes
        # the labels: the network's classes, or (classifier guidance on an unconditional network) the classifier's
        self.classes = num_classes if num_classes is not None else classifier_classes
        self.device, self.precision = torch.device(device), precision
        self.amp = autocast(self.device, precision)
        if settings.sampler not in SAMPLERS:
            raise UsageError(f"--sampler: unknown {settings.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        self.entry = SAMPLERS[settings.sampler]
        self.loop = self.entry.loop
        self.T = diffusion.num_timesteps
        self.steps = settings.steps if settings.steps is not None else min(self.entry.steps or self.T, self.T)
        self.skip = settings.skip if settings.skip is not None else self.entry.skip
        self.check_settings(diffusion, classifier)
        self.diffusion = self.respaced(diffusion)
        self.kept = self.diffusion.num_timesteps
        self.check_ranges()

        # --compile: the network itself is compiled (guidance's arithmetic around it stays eager); once only, so that
        # samplers built on one compiled network share its graphs (evaluate.py's table)
        self.latent_dim = getattr(model, "latent_dim", None)  # a DDGAN generator's nz
        if compile and not isinstance(model, Compiled):
            model = Compiled(model, self.device)
        # guidance: wrap the network (G5) and/or add a cond_fn (G3); the loop does not know which
        self.model, self.cond_fn = model, None
        if settings.cfg_scale is not None:
            self.model = ClassifierFreeGuidance(model, settings.cfg_scale, null_class=num_classes)
        if classifier is not None:
            scale = 1.0 if settings.classifier_scale is None else settings.classifier_scale
            self.cond_fn = classifier_cond_fn(classifier, scale)
            if num_classes is None:
                self.model = IgnoreLabels(model)  # y is for the classifier only
        self.conditional = num_classes is not None or classifier is not None
        self.options = self.loop_options()

    def respaced(self, diffusion):
        """The diffusion the loop walks: --var's fixed variance, respaced ONCE to --steps by --skip (D4)."""
        if self.settings.var is not None:
            diffusion = GaussianDiffusion(diffusion.betas, VARIANCE_FLAGS[self.settings.var], diffusion.loss_type,
                                          diffusion.timestep_map)
        if self.steps == self.T:
            return diffusion
        try:
            kept = STEP_SCHEDULES[self.skip](diffusion.alphas_cumprod, self.steps)
        except ValueError as e:  # quad cannot place that many distinct steps
            raise UsageError(f"--steps: {e}") from None
        respaced = diffusion.respace(kept)
        # logsnr and karras merge targets that round to the same level of the T: say so, never hide it
        if respaced.num_timesteps < self.steps:
            say(f"note: --skip {self.skip}: {self.steps} steps round to {respaced.num_timesteps} distinct levels of "
                f"the T = {self.T} (the low-noise end is denser than one step); sampling on {respaced.num_timesteps}")
        return respaced

    def loop_options(self):
        """The settings the chosen loop takes, under its keyword names, and the cond_fn of classifier guidance."""
        options = {}
        for f in SETTINGS:
            if f.name in self.entry.options:
                options[f.metadata["keyword"] or f.name] = getattr(self.settings, f.name)
        if self.settings.sampler == "ddgan":
            options["latent_dim"] = self.latent_dim  # the generator's nz, a property of the network
        if self.cond_fn is not None:
            options["cond_fn"] = self.cond_fn
        return options

    # -- drawing ---------------------------------------------------------------------------------------------------

    def labels(self, n, generator):
        """The class of each image: --class, or uniform labels sorted so that a grid is laid out by class."""
        if not self.conditional:
            return None
        if self.settings.label is not None:
            return torch.full((n,), self.settings.label, dtype=torch.long, device=self.device)
        y = torch.randint(0, self.classes, (n,), generator=generator, device=generator.device)
        return y.sort().values.to(self.device)

    def batches(self, n, batch_size=256, seed=0, show_progress=True, latents=None, labels=None, desc="sampling",
                draw_x_T=True):
        """This process's batches of n images (Batches: iterate, set each batch's x0, then .images()).
        draw_x_T=False: the batches carry no x_T (an edit starts from a picture), their generators untouched."""
        return Batches(self, n, batch_size, seed, show_progress, latents, labels, desc, draw_x_T)

    def generate(self, n, batch_size=256, seed=0, show_progress=True, latents=None, labels=None, desc="sampling"):
        """n images as uint8 numpy [n, H, W, C] and their labels (int64 numpy [n], or None): every batch's x_T
        through the chosen loop on every step of the respaced diffusion. `latents` / `labels` (tensors [n, ...])
        replace the drawn x_T / labels (interpolation, inversion)."""
        batches = self.batches(n, batch_size, seed, show_progress, latents, labels, desc)
        for b in batches:
            with self.amp:
                b.x0 = self.loop(self.diffusion, batches.model, b.x_T.shape, noise=b.x_T,
                                 model_kwargs=b.model_kwargs, generator=b.generator, **self.options)
        return batches.images()

    # -- naming ----------------------------------------------------------------------------------------------------

    def nfe(self):
        """Network evaluations per image: 2N - 1 for Heun on N kept steps (EDM Alg. 1), N for the one-call loops."""
        if self.settings.sampler == "heun":
            return 2 * self.kept - 1
        if self.settings.sampler in ("ddpm", "ddim", "dpmpp2m"):
            return self.kept
        return None  # the score samplers' count depends on their corrector / Langevin steps

    def describe(self, steps=None):
        """One line for the user: 'ddim on 50 of 1000 steps, eta1, quad, cg4, class3' (+ NFE where it differs).
        `steps`: the steps actually run, when fewer than the chain's (an edit starts part-way down)."""
        ran = self.kept if steps is None else steps
        head = f"{self.settings.sampler} on {ran} of {self.T} steps"
        if steps is not None and steps != self.kept:
            head += f" (from t0 of a {self.kept}-step chain)"
        if self.settings.sampler in ("dpmpp2m", "heun"):
            head += f" ({self.nfe()} NFE)"
        return ", ".join([head] + self.tags()[1:])

    def tags(self):
        """The parts of an output name: sampler + steps, then every setting that differs from its default."""
        o = self.settings
        tags = [f"{o.sampler}{self.steps}"]
        for f in SETTINGS:
            value = getattr(o, f.name)
            if f.name == "skip":  # the step schedule, where it is not the sampler's own
                if self.steps < self.T and self.skip != self.entry.skip:
                    tags.append(self.skip)
            elif f.name == "classifier_scale":  # classifier guidance: the scale in use, whenever there is one
                if self.cond_fn is not None:
                    tags.append(f"cg{self.cond_fn.scale:g}")
            elif f.metadata["tag"] and value != f.default:
                tags.append(f.metadata["tag"].format(value))
        return tags

    def name(self, seed=None, n=None, default_n=64, batch_size=None, default_batch_size=256, prefix=None):
        """A file name (no extension) that says what made the images: ddim50_eta1_quad_cg4_class3_seed0[_n100]."""
        parts = ([prefix] if prefix else []) + self.tags()
        if seed is not None:
            parts.append(f"seed{seed}")
        if n is not None and n != default_n:
            parts.append(f"n{n}")
        if batch_size is not None and batch_size != default_batch_size and n is not None and n > batch_size:
            parts.append(f"bs{batch_size}")  # the batch size changes the images where it splits them
        return "_".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# From a checkpoint
# ----------------------------------------------------------------------------------------------------------------

def from_checkpoint(ckpt, settings=Settings(), device="cpu", precision="auto", classifier=None, compile=False):
    """A Sampler for a loaded diffusion checkpoint (checkpoint.load) and, for guidance, a loaded classifier one.
    compile: torch.compile the network (Compiled: CUDA graphs on CUDA)."""
    where = ckpt.get("path", "the checkpoint")
    # DDGAN (Xiao et al. 2022): its generator G(x_t, z, t) predicts x_0', not eps: only its own chain can draw with it,
    # and its chain needs a generator
    if (ckpt["kind"] == "ddgan") != (settings.sampler == "ddgan"):
        if ckpt["kind"] == "ddgan":
            raise UsageError(f"--sampler: {where} holds a DDGAN generator, which only --sampler ddgan draws with "
                             f"(its {ckpt['diffusion_args']['timesteps']}-step chain); pass --sampler ddgan")
        if ckpt["kind"] == "diffusion":
            raise UsageError(f"--sampler: ddgan needs a DDGAN run (python train.py --task ddgan), and {where} holds "
                             f"an eps-model; pick another --sampler")
    if ckpt["kind"] not in ("diffusion", "ddgan"):
        raise UsageError(f"--checkpoint: {where} holds a {ckpt['kind']}, not a diffusion model; pass a diffusion run "
                         "(a classifier goes to --classifier)")
    model = checkpoint.build_network(ckpt, use_ema=settings.ema, device=device)
    diffusion = checkpoint.build_diffusion(ckpt["diffusion_args"])
    args = ckpt["model_args"]
    shape = (args.get("in_channels", 3), args["image_size"], args["image_size"])
    net, classes = None, None
    if classifier is not None:
        cwhere = classifier.get("path", "the classifier")
        if classifier["kind"] != "classifier":
            raise UsageError(f"--classifier: {cwhere} holds a {classifier['kind']} network, not a noisy classifier; "
                             "train one with `python train.py --task classifier`")
        cargs, classes = classifier["model_args"], checkpoint.num_classes_of(classifier)
        own = checkpoint.num_classes_of(ckpt)
        if cargs["image_size"] != args["image_size"] or (own is not None and classes != own):
            raise UsageError(f"--classifier: {cwhere} was trained on {classes} classes of "
                             f"{cargs['image_size']}x{cargs['image_size']} images, the diffusion run on "
                             f"{own or 'unlabelled'} {args['image_size']}x{args['image_size']} images")
        net = checkpoint.build_network(classifier, device=device, flag="--classifier")
    return Sampler(model, diffusion, shape, settings, checkpoint.num_classes_of(ckpt), net, classes, device, precision,
                   compile)
