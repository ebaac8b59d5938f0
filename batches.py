"""
Batches and seeds: n images drawn in batches, the same images however they are split.

Batch i draws x_T, its labels and every step's noise from its own generator, seeded with (seed, i): the same seed
and batch size give the same images on the same device. Under torchrun, rank r draws batches r, r + W, ...; every
rank gets the union back, in batch order (rank 0 alone writes files). Non-finite images are counted on the device
and refused once, at the end, with the sampler's likely cause, instead of being written as black pictures.

    batches = sampler.batches(n=64, batch_size=256, seed=0)    # sampling.Sampler.batches
    for b in batches:
        b.x0 = loop(diffusion, batches.model, b.x_T.shape, noise=b.x_T, model_kwargs=b.model_kwargs, generator=b.generator)
    images, labels = batches.images()                            # uint8 [64, H, W, C], int64 [64] or None
"""

import dataclasses

import numpy as np
import torch

import data
from cli import StepProgress, UsageError, progress


def batch_generator(device, seed, i):
    """The generator of batch i of a call with this seed: x_T, labels and every step's noise of that batch."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + i) % (1 << 63))


@dataclasses.dataclass
class Batch:
    """One batch: its index, size, x_T, model_kwargs (the labels) and generator; the caller sets x0, the loop's
    output."""
    index: int
    size: int
    x_T: torch.Tensor
    model_kwargs: dict
    generator: torch.Generator
    x0: torch.Tensor = None


class Batches:
    """This process's batches of an n-image call, each with its own generator (seed, i), a bar counting images, and
    the check and gathering of the results.

    Iterating yields Batch objects; the caller runs a loop and sets `batch.x0` (floats in [-1, 1]). `model` is the
    network to call: the sampler's, with the bar moved along as the batch walks down the levels (StepProgress).
    `images()` returns all n images (uint8 numpy [n, H, W, C]) and labels in batch order, on every rank: under
    torchrun rank r runs batches r, r + W, ... and the ranks exchange them (all_gather_object of uint8 arrays).
    Non-finite values are counted on the device and checked once, at the end, with their likely cause.
    """

    def __init__(self, sampler, n, batch_size, seed, show_progress, latents, labels, desc, draw_x_T=True):
        import torch.distributed as dist  # noqa: PLC0415
        self.sampler, self.n, self.seed, self.desc = sampler, n, seed, desc
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.latents, self.given_labels, self.draw_x_T = latents, labels, draw_x_T
        self.starts = list(range(0, n, batch_size))
        self.batch_size = batch_size
        self.mine = [i for i in range(len(self.starts)) if i % self.world == self.rank]  # batch i on rank i % W
        share = sum(self.size(i) for i in self.mine)
        self.bar = progress(share, desc if self.world == 1 else f"{desc} (rank 0 of {self.world})", unit="img",
                            disable=not show_progress or self.rank != 0)
        self.model = StepProgress(sampler.model, sampler.diffusion, self.bar)
        self.done, self.bad = {}, torch.zeros((), device=sampler.device)

    def size(self, i):
        return min(self.batch_size, self.n - self.starts[i])

    def __iter__(self):
        s = self.sampler
        for i in self.mine:
            start, m = self.starts[i], self.size(i)
            g = batch_generator(s.device, self.seed, i)
            x_T = (self.latents[start:start + m].to(s.device) if self.latents is not None
                   else torch.randn((m, *s.image_shape), generator=g, device=s.device) if self.draw_x_T else None)
            y = s.labels(m, g) if self.given_labels is None else self.given_labels[start:start + m].to(s.device)
            batch = Batch(i, m, x_T, {} if y is None else {"y": y}, g)
            self.model.start(m)
            yield batch
            self.model.finish()
            x = batch.x0.float()
            self.bad = self.bad + (~torch.isfinite(x)).sum()  # no host sync here: checked once, after the last batch
            self.done[i] = (data.to_uint8_images(x), None if y is None else y.cpu().numpy())
        self.bar.close()

    def images(self):
        """All n images and their labels (or None), in batch order; non-finite results are refused here."""
        import torch.distributed as dist  # noqa: PLC0415
        batches, bad = self.done, int(self.bad)
        if self.world > 1:  # every rank gets every rank's batches (and non-finite count): the union, in batch order
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (batches, bad))
            batches = {i: b for part, _ in gathered for i, b in part.items()}
            bad = sum(count for _, count in gathered)
        if bad > 0:
            raise UsageError(f"{self.desc} produced {bad} non-finite values (the chain diverged) "
                             f"and nothing was written; {self.sampler.likely_cause()}")
        images = np.concatenate([batches[i][0] for i in range(len(self.starts))])
        classes = [batches[i][1] for i in range(len(self.starts)) if batches[i][1] is not None]
        return images, (np.concatenate(classes) if classes else None)
