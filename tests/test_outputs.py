"""outputs.py, the writer of every result file, in this process: the rare paths, cheaply.

What is pinned: a forced rewrite that fails (a full disk in the second file, an error naming it) keeps the earlier
files exactly; Ctrl-C while the files of a result get their names waits until all have them; an appended record
starts a line of its own after another tool's half line.
"""

import errno
import os
import signal

import pytest


# ----------------------------------------------------------------------------------------------------------------
# outputs.write and outputs.append_line in this process (the rare paths, cheaply)
# ----------------------------------------------------------------------------------------------------------------

def test_a_forced_rewrite_that_fails_keeps_the_earlier_pair(tmp_path, monkeypatch):
    import cli
    import outputs
    pair = {str(tmp_path / "a.png"): b"old png", str(tmp_path / "a.npz"): b"old npz"}
    outputs.write({p: (lambda f, c=c: f.write(c)) for p, c in pair.items()})

    def full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    # the disk fills up in the second new file
    with pytest.raises(cli.OutputError, match=r"cannot write .*a\.npz: No space left on device; nothing was written"):
        outputs.write({str(tmp_path / "a.png"): lambda f: f.write(b"new png"), str(tmp_path / "a.npz"): full},
                      force=True)
    assert {p: open(p, "rb").read() for p in pair} == pair and sorted(os.listdir(tmp_path)) == ["a.npz", "a.png"]
    # the second name fails, the first new file already in place: it is taken back, the earlier one restored
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(cli.OutputError, match="Input/output error; nothing was written"):
        outputs.write({p: lambda f: f.write(b"new") for p in pair}, force=True)
    assert {p: open(p, "rb").read() for p in pair} == pair and sorted(os.listdir(tmp_path)) == ["a.npz", "a.png"]


def test_ctrl_c_while_the_pair_is_named_waits_until_both_are(tmp_path, monkeypatch):
    import outputs
    real = os.link

    def link(src, dst, **kwargs):  # Ctrl-C arrives between the two names
        os.kill(os.getpid(), signal.SIGINT)
        return real(src, dst, **kwargs)
    monkeypatch.setattr(os, "link", link)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C, whatever runs pytest
    try:
        with pytest.raises(KeyboardInterrupt):
            outputs.write({str(tmp_path / "a.png"): lambda f: f.write(b"png"),
                           str(tmp_path / "a.npz"): lambda f: f.write(b"npz")})
    finally:
        signal.signal(signal.SIGINT, previous)
    # raised once both had their names: the pair is whole, and nothing else is left
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "a.png"] and (tmp_path / "a.npz").read_bytes() == b"npz"


def test_append_line_starts_a_line_of_its_own(tmp_path):
    import outputs
    log = tmp_path / "r.jsonl"
    log.write_text('{"a": 1}\n{"half a li')  # another tool died mid-line
    outputs.append_line(str(log), '{"b": 2}')
    assert log.read_text().splitlines() == ['{"a": 1}', '{"half a li', '{"b": 2}']
