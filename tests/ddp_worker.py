"""Run by tests/test_train.py under torchrun: trains until stopped, then every rank saves its own weights, the step it
stopped at and why, for the test to compare."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train  # noqa: E402

torch.set_num_threads(1)
run, training = train.setup(sys.argv[1:])
with open(os.path.join(run.out, f"pid{run.rank}"), "w") as f:  # for the test to signal one rank alone
    f.write(str(os.getpid()))
try:
    outcome = train.train(run, training)
finally:
    run.close()
torch.save({"model": training.model.state_dict(), "step": run.step, "outcome": getattr(outcome, "name", outcome)},
           os.path.join(run.out, f"rank{run.rank}.pt"))
sys.exit(run.finish(outcome))
