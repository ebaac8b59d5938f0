# Makes the flat top-level modules (ddpm.py, unet.py, ...) importable from tests/ without installing anything.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The tests' tensors are tiny: one intra-op thread is faster than two (no spin-waiting between ops), and keeps the
# suite's time steady when the machine is busy.
import torch  # noqa: E402

torch.set_num_threads(1)
