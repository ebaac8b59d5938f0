"""Run by tests/test_train.py under torchrun: trains, then every rank saves its own weights for comparison."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train  # noqa: E402

torch.set_num_threads(1)
args = train.build_parser().parse_args(sys.argv[1:])
result = train.train(args)
torch.save(result["model"].state_dict(), os.path.join(args.out, f"rank{os.environ['RANK']}.pt"))
