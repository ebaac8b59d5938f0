"""Runs the repository's scripts as `python SCRIPT ARGS` runs them, without paying for a Python and torch start each
time: tests/test_matrix.py starts this once, it imports what the scripts import, and then, for each request, forks a
child that changes into the request's folder, points fds 1 and 2 at the request's files, sets sys.argv and runs the
script with runpy as __main__ (its `if __name__ == "__main__": main_guard(main)` included). The child's exit status
is the script's, as a shell would see it: 0, SystemExit's code, or 1 with the traceback on stderr for an uncaught
exception.

Protocol, one JSON object per line: request {"script", "args", "cwd", "stdout", "stderr"} on stdin; reply {"rc",
"seconds", "cpu"} on stdout (the exit status, the wall time and the child's CPU time). An empty line or EOF ends
the server.

The parent never runs a torch computation, only imports: a fork after an intra-op thread pool has started could hang
in the child (OpenMP is not fork-safe), and every child starts from the same clean state."""

import json
import os
import runpy
import signal
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # what `python ROOT/sample.py` puts first on sys.path: the script's own folder
os.environ.setdefault("MPLBACKEND", "Agg")

# the imports every script makes, paid once here instead of once per command
import numpy  # noqa: E402, F401
import scipy.linalg  # noqa: E402
import torch  # noqa: E402

import checkpoint  # noqa: E402, F401
import cli  # noqa: E402, F401
import data  # noqa: E402, F401
import edit  # noqa: E402, F401
import pretrained  # noqa: E402, F401
import sampling  # noqa: E402, F401

import matplotlib.pyplot  # noqa: E402, F401  (figures.py, train.py's loss.png)
import PIL.Image  # noqa: E402, F401
import safetensors.torch  # noqa: E402, F401
import torchvision.transforms.functional  # noqa: E402, F401

# more modules to import once, comma-separated (SCRIPT_SERVER_PRELOAD, e.g. the scripts themselves: their imports
# then cost nothing per request; tests/test_fuzz.py, whose requests are mostly refused in milliseconds)
for _name in filter(None, os.environ.get("SCRIPT_SERVER_PRELOAD", "").split(",")):
    __import__(_name)

# tiny networks: one intra-op thread is faster than two, as in conftest.py
torch.set_num_threads(1)

# FID's 2048x2048 matrix square root (evaluate.frechet_distance) costs 15-90 s on a 2-core CPU. The FID cells score
# against statistics with a zero covariance, so the product S1 S2 they take the root of is the zero matrix, whose
# root is exactly zero: answered here without scipy's Schur decomposition; any other matrix still goes to scipy.
_sqrtm = scipy.linalg.sqrtm


def sqrtm(a, *args, **kwargs):
    a = numpy.asarray(a)
    if a.ndim == 2 and not a.any():
        return numpy.zeros_like(a, dtype=numpy.float64)
    return _sqrtm(a, *args, **kwargs)


scipy.linalg.sqrtm = sqrtm
# seconds: a cell that hangs is killed by SIGALRM (exit status -14) instead of stalling the tests; tests/test_fuzz.py
# asks for less (SCRIPT_SERVER_TIMEOUT), and caps each child's address space (SCRIPT_SERVER_MEMORY_GB more than the
# imports mapped) so that a value that slipped past the checks fails with a MemoryError instead of swapping the machine
TIMEOUT = int(os.environ.get("SCRIPT_SERVER_TIMEOUT", "300"))
MEMORY_GB = float(os.environ.get("SCRIPT_SERVER_MEMORY_GB", "0"))


def child(request):
    """In the forked child: run the script; never returns."""
    code = 70
    try:
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        os.chdir(request["cwd"])
        signal.alarm(TIMEOUT)
        if MEMORY_GB:
            import resource  # noqa: PLC0415
            with open("/proc/self/statm") as f:  # what the imports already mapped, plus the allowance
                limit = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") + int(MEMORY_GB * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        script = os.path.join(ROOT, request["script"])
        sys.argv = [script, *request["args"]]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:  # sys.exit("message"): Python prints it and exits 1
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main():
    for line in sys.stdin:
        if not line.strip():
            break
        request = json.loads(line)
        start = time.time()
        pid = os.fork()
        if pid == 0:
            child(request)
        _, status, usage = os.wait4(pid, 0)
        reply = {"rc": os.waitstatus_to_exitcode(status), "seconds": round(time.time() - start, 3),
                 "cpu": round(usage.ru_utime + usage.ru_stime, 3)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
