"""benchmarks/gpu_run.py: its --tiny rehearsal end to end in a subprocess (every stage runs its real command line and
leaves its result, and the summary says so), the one-line refusal without CUDA, a stage stopped at its limit.

The rehearsal's FID stages get two stand-ins, so that it takes seconds on one core: an Inception network of no
weights (the image's channel means, 2048 features) and, in those subprocesses alone, scipy's sqrtm (a 2048 x 2048
square root takes 12-30 s on a small CPU; tests/test_evaluate.py replaces the distance in-process for the same
reason). Everything else (evaluate.py's sampling, saving, scoring and results line) runs as on the GPU."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_run  # noqa: E402

SITECUSTOMIZE = """import os, sys
if os.path.basename(sys.argv[0]) == "evaluate.py":  # the rehearsal's FID stages: no 2048 x 2048 sqrtm on a CPU
    import numpy as np
    from scipy import linalg
    linalg.sqrtm = lambda a, *args, **kwargs: np.zeros_like(a)
"""


class ChannelMeans(torch.nn.Module):
    """A stand-in for the FID Inception network: [N, 3, 299, 299] -> [N, 2048]."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return (x.mean(dim=(2, 3)) * self.scale).repeat(1, 683)[:, :2048]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One --tiny run for all the checks below: (its output folder, the completed process)."""
    tmp = tmp_path_factory.mktemp("gpu_run")
    torch.jit.script(ChannelMeans()).save(str(tmp / "inception.pt"))
    np.savez(tmp / "ref.npz", mu=np.zeros(2048, np.float32), sigma=np.zeros((2048, 2048), np.float32))
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp / "site"), os.environ.get("PYTHONPATH")])))
    out = tmp / "out"
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_run.py"), "--tiny", "--out", str(out),
                           "--inception", str(tmp / "inception.pt"), "--fid-ref", str(tmp / "ref.npz"),
                           "--bundle", str(tmp / "results.tar.gz")],
                          cwd=str(tmp), env=env, capture_output=True, text=True, timeout=300)
    proc.seconds = time.time() - t0
    return out, proc


def test_tiny_rehearsal_runs_every_stage_and_writes_its_result(rehearsal):
    out, proc = rehearsal
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == list(gpu_run.STAGES)  # every stage, in order
    assert stages["tests"]["status"] == "skipped" and "--tiny" in stages["tests"]["why"]
    for name in gpu_run.STAGES[1:]:
        assert stages[name]["status"] == "ok", (name, stages[name].get("tail"))
        assert (out / stages[name]["log"]).stat().st_size > 0
    table = (out / "bench.md").read_text()
    assert "| train (batch 4) | this repo" in table and "| sample" in table  # bench.py --tiny's two tables
    assert json.loads((out / "bench.json").read_text()) and stages["bench"]["results"]["table"] in table
    assert list((out / "profile").glob("*.json.gz"))  # the profiled training step
    assert (out / "run" / "ckpt.pt").is_file() and (out / "run" / "samples.png").is_file()
    assert stages["train"]["results"]["last_log"]["step"] == 2
    fids = [json.loads(line) for line in (out / "fid.jsonl").read_text().splitlines()]
    assert [(f["sampler"], f["steps"], f["n"]) for f in fids] == [("ddim", 2, 4), ("dpmpp2m", 3, 4)]
    assert all(np.isfinite(f["value"]) for f in fids)
    for name in ("fid_ddim", "fid_dpmpp"):
        assert stages[name]["results"]["fid"]["value"] >= 0
    md = (out / "summary.md").read_text()
    assert all(f"| {name} |" in md for name in gpu_run.STAGES) and "FID" in md
    assert json.loads((out / "preflight.json").read_text())["skipped"] == {"tests": stages["tests"]["why"]}


def test_tiny_rehearsal_bundles_the_small_results(rehearsal):
    import tarfile  # noqa: PLC0415
    out, _ = rehearsal
    with tarfile.open(out.parent / "results.tar.gz") as tar:
        names = {os.path.relpath(n, "out") for n in tar.getnames()}
    assert {"summary.json", "summary.md", "preflight.json", "bench.md", "fid.jsonl",
            "run/samples.png"} <= names
    assert not any(n.endswith((".pt", ".npz", ".json.gz")) for n in names)  # no checkpoint, arrays, traces


def test_without_cuda_one_line_and_exit_2_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_run, "cuda_device", lambda: None)
    out = tmp_path / "out"
    assert gpu_run.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "--tiny" in err
    assert not out.exists()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for argv, word in ((["--skip", "nope"], "--skip"), (["--out", str(tmp_path / "full")], "--out")):
        assert gpu_run.main(["--tiny", "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and word in err


def test_a_stage_past_its_limit_is_stopped_with_its_children(tmp_path):
    log = tmp_path / "stage.log"
    t0 = time.time()
    rc, _ = gpu_run.run_command([sys.executable, "-c", "import subprocess, sys, time; print('started', flush=True); "
                                 "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                                 "time.sleep(60)"], str(log), None, 1.0)
    assert rc is None and time.time() - t0 < 15
    text = log.read_text()
    assert "started" in text and "stopped at its limit of 1 s" in text
