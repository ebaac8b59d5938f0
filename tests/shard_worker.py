"""Run by tests/test_table.py under torchrun: sample.py's command line, with every call that writes samples logged
with the rank that made it (to $SHARD_LOG), for the test to check that rank 0 alone writes; and every SDEdit batch
(--edit) with its rank and size, for the test to check that the ranks share the batches."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import outputs  # noqa: E402
import sample  # noqa: E402
from cli import main_guard  # noqa: E402

torch.set_num_threads(1)
save_samples, sdedit = outputs.save_samples, sample.sdedit


def logged(*args, **kwargs):
    with open(os.environ["SHARD_LOG"], "a") as f:
        f.write(f"rank {os.environ.get('RANK')}\n")
    return save_samples(*args, **kwargs)


def logged_edit(diffusion, model, x, *args, **kwargs):
    with open(os.environ["SHARD_LOG"], "a") as f:
        f.write(f"edit of {x.shape[0]} on rank {os.environ.get('RANK')}\n")
    return sdedit(diffusion, model, x, *args, **kwargs)


outputs.save_samples = logged
sample.sdedit = logged_edit
main_guard(sample.main)
