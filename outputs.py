"""
The files the scripts write (sample.py's .png/.npz pairs, figures.py's PNGs, evaluate.py's results.jsonl, tables
and cached statistics): a result is whole or absent, and never silently replaces another. The rules, each in full
in docs/outputs.md:

  1. ONE WRITER PER NAME. Before the work, `claim` takes each output path for this process (an exclusive flock on
     PATH.lock holding the writer's pid, then the existence check): a second process claiming it, or an existing
     file without --force, is refused in one line before its own work (cli.UsageError, exit code 2). The operating
     system drops a flock when its process dies, even by SIGKILL, so a lock left behind never blocks anyone.

  2. ALL OR NOTHING. `write` writes every file of a result to a temporary beside its target, fsyncs each, and only
     when all are complete names them: without --force by os.link (a file that appeared meanwhile is refused, never
     replaced), with --force by os.replace, the earlier file kept aside until every new one is in place. Any failure
     (a full disk, an interrupt) removes the temporaries and restores the earlier files; a system error is one line,
     `error: cannot write PATH: ...; nothing was written`, exit code 1 (cli.OutputError).

  3. A LINE APPENDED WHOLE. `append_line` adds a record to a log (results.jsonl) under an exclusive flock, in one
     write, fsynced; a failed write is cut back to the length the file had before it.

  4. NOT HALF DONE BY A SIGNAL. Ctrl-C or SIGTERM during the renames, an append, or the clean-up after a failure
     waits the microseconds until that step is done, and is then raised as usual (exit code 130 / 143).

The rules know nothing of images or diffusion: a file's content is a function that writes it to an open binary file.
At the end, `save_samples` / `write_samples` use them for the one result made of images: a .png grid and its .npz.
"""

import atexit
import dataclasses
import errno
import fcntl
import glob
import os
import signal
import threading
from contextlib import contextmanager

import numpy as np
import torch

import data
from cli import OutputError, UsageError, check_name, say, wrote

# the claims this process holds: lock-file path -> its open descriptor (the flock lives as long as the descriptor)
_HELD = {}
# os.link fails with these where a file system has no hard links (FAT, some network and FUSE file systems): there a
# check-then-rename takes its place (the claim still keeps other writers of these scripts away)
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


def lock_name(path):
    """The lock file of an output path: beside it, one per path."""
    return f"{path}.lock"


def temporary_name(path):
    """Where `write` writes a file before naming it: beside the target, marked with the writer's pid."""
    return f"{path}.tmp{os.getpid()}"


def backup_name(path):
    """Where `write --force` keeps the earlier file until the new one is in place: beside it, with the pid."""
    return f"{path}.old{os.getpid()}"


# ----------------------------------------------------------------------------------------------------------------
# Claiming a name, before the work
# ----------------------------------------------------------------------------------------------------------------

def claim(paths, flag, force=False, typed=True, hold=True):
    """Check, before any work, that each of `paths` may be written, and take it for this process.

    flag:  the option that chose the name (--out, --save-samples), named in the messages where `typed` (the user gave
           it); a default name's message names the file and --force only, never a flag the user did not type.
    force: an existing file may be replaced (--force); a name another live process is writing never may.
    hold:  False checks only (existence, a writable folder) and takes no lock: under torchrun every rank checks the
           names, so that a refusal is the same on every rank, and rank 0 alone claims and writes them.
    Returns `paths`. Refusals are cli.UsageError (one line, exit code 2); a refused claim keeps nothing.
    """
    taken = []
    try:
        for path in paths:
            where = f"{flag}: " if typed else ""
            if os.path.isdir(path):
                raise UsageError(f"{where}{path} is a directory; give a file name")
            folder = os.path.dirname(os.path.abspath(path))
            if hold:
                _lock(path, flag, typed)
                taken.append(path)
                remove_stale(path)  # a writer killed by SIGKILL leaves its temporaries: the name is ours now
            else:
                _check_folder(folder, flag, typed)
            if os.path.lexists(path) and not force:
                raise UsageError(f"{where}{path} already exists; pass --force to replace it"
                                 + (" or choose another name" if typed else ""))
    except BaseException:
        release(taken)
        raise
    return list(paths)


def _unwritable(folder, error, flag, typed):
    reason = error.strerror or error
    if typed:
        return UsageError(f"{flag}: cannot write to {folder} ({reason}); choose a writable directory")
    return UsageError(f"cannot write to {folder} ({reason}); choose a writable place with {flag}")


def _check_folder(folder, flag, typed):
    """Make the folder and prove it is writable now (a probe file, removed), before the work."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test{os.getpid()}")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o644))
        os.remove(probe)
    except OSError as e:
        raise _unwritable(folder, e, flag, typed) from None


def _lock(path, flag, typed):
    """An exclusive, non-blocking flock on PATH.lock, which then holds our pid; a busy one is a one-line refusal."""
    name = lock_name(path)
    if name in _HELD:  # this process holds it already (a script's main run twice in one process: the tests)
        return
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _unwritable(folder, e, flag, typed) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"{flag + ': ' if typed else ''}{path} is being written by another process (pid "
                             f"{holder}) right now; wait for it to finish, then pass --force to replace its result"
                             + (", or choose another name" if typed else "")) from None
        # The lock is ours, but is it still the file at that name? Its previous holder removes the lock file before
        # it unlocks (release), so between our open and our flock the file may have been removed: a lock on a
        # removed file guards nothing, and the name is tried again.
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(name))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message of whoever is refused
    if not _HELD:
        atexit.register(release)  # a script called without cli.main_guard still gives its claims back at exit
    _HELD[name] = fd


def release(paths=None):
    """Give back this process's claims on `paths` (all of them when None): each lock file is removed, then
    unlocked (in that order: see _lock). Claims not held are ignored."""
    names = list(_HELD) if paths is None else [lock_name(p) for p in paths]
    for name in names:
        fd = _HELD.pop(name, None)
        if fd is None:
            continue
        try:
            os.remove(name)
        except OSError:
            pass
        os.close(fd)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(path):
    """Remove what a writer of `path` killed mid-write (SIGKILL: no clean-up) left: its temporaries; and put back an
    earlier file it had set aside (PATH.oldPID) if the name has none, else remove that second link. Only files of
    processes that are no longer alive are touched (or of a dead process whose pid this one now has)."""
    for leftover in glob.glob(glob.escape(path) + ".tmp*") + glob.glob(glob.escape(path) + ".old*"):
        pid = leftover[len(path) + 4:]
        if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
            continue
        try:
            if leftover[len(path):].startswith(".old") and not os.path.lexists(path):
                os.rename(leftover, path)
            else:
                os.remove(leftover)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------------------------
# Writing, all or nothing
# ----------------------------------------------------------------------------------------------------------------

@contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM that arrive inside the block are noted, and raised once it is done (as they would have
    been: the same handler, so KeyboardInterrupt, cli.Interrupted, or the default end of the process)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    caught, previous = [], {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not None:  # None: a handler installed from C, left alone
            previous[signum] = signal.signal(signum, lambda s, frame: caught.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])


def _name(tmp, path, force):
    """Give the complete temporary its final name: replacing (force) or never replacing (os.link: FileExistsError)."""
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(path):  # no hard links here: check, then rename
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
        os.rename(tmp, path)


def _set_aside(path):
    """Keep an existing file under PATH.oldPID until its replacement is in place (a second link: the name keeps the
    earlier file meanwhile; a rename where there are no hard links). Returns the backup's name, or None."""
    if not os.path.lexists(path):
        return None
    backup = backup_name(path)
    try:
        os.link(path, backup)
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        os.rename(path, backup)
    return backup


def _restore(backup, path):
    """Put the earlier file (set aside as `backup`) back at `path`. Where the name still holds it (the new file never
    got the name) the backup is a second link of the same file, which rename would leave in place: removed."""
    try:
        same = os.path.samestat(os.stat(backup), os.stat(path))
    except FileNotFoundError:
        same = False
    if same:
        os.remove(backup)
    else:
        os.replace(backup, path)


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _sync_folders(paths):
    """fsync the folders, so that the new names survive a power cut too (best effort: not every file system can)."""
    for folder in {os.path.dirname(os.path.abspath(p)) for p in paths}:
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def write(files, force=False):
    """Write a result of one or more files, all or nothing: {path: writer}, writer(f) writing the content to the
    open binary file f. Returns the paths, in order.

    Without `force` an existing path is refused (it appeared during the work, since `claim` checked before it):
    cli.UsageError, exit code 2. A system error (ENOSPC, EACCES, ...) is cli.OutputError, exit code 1; an interrupt
    is raised as it came. In every failure nothing of the result is left and the earlier files are as they were.
    The claims on the paths (claim) are given back at the end, whether or not the write succeeded.
    """
    paths = list(files)
    temporaries, named, backups, current, whole = [], [], {}, None, False
    try:
        for path in paths:
            current = path
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = temporary_name(path)
            temporaries.append(tmp)
            with open(tmp, "wb") as f:  # a name of ours alone: our pid
                files[path](f)
                f.flush()
                os.fsync(f.fileno())  # on the disk before it gets its name: a crash leaves the old or the new file
        with signals_deferred():  # every file complete: the names, quickly and uninterrupted
            for path, tmp in zip(paths, temporaries):
                current = path
                if force:
                    backups[path] = _set_aside(path)
                _name(tmp, path, force)
                named.append(path)
            whole, current = True, None  # every file has its name: the result is written
            _sync_folders(paths)
            for leftover in temporaries + [b for b in backups.values() if b]:
                try:
                    _remove(leftover)
                except OSError:
                    pass
    except BaseException as e:
        if whole:  # a signal that waited for the names (signals_deferred): raised now, the result kept
            raise
        with signals_deferred():  # take it all back: the new names, the temporaries; the earlier files restored
            for path in paths:
                try:
                    if backups.get(path):
                        _restore(backups[path], path)
                    elif path in named:
                        os.remove(path)
                except OSError:
                    pass
            for tmp in temporaries:
                try:
                    _remove(tmp)
                except OSError:
                    pass
        if isinstance(e, FileExistsError):
            raise UsageError(f"{current} appeared while this run was working (another process wrote it); nothing "
                             "was written: pass --force to replace it") from None
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {current}: {e.strerror or e}; nothing was written") from None
        raise
    finally:
        release(paths)
    return paths


def append_line(path, line):
    """Append `line` (one JSON record, say) to the log at `path`, whole or not at all.

    Appenders take turns under an exclusive flock on the log itself; the line goes in one write (O_APPEND), then
    fsync; if either fails (ENOSPC after half the bytes) the file is cut back to its length before, and the failure
    is cli.OutputError (exit code 1). A log whose last line lacks its newline (another tool's crash) gets one first,
    so that the record is a line of its own.
    """
    data = (line.rstrip("\n") + "\n").encode()
    readable = True
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except PermissionError:  # a write-only log: appended to without the newline check
            fd, readable = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), False
    except OSError as e:
        raise OutputError(f"cannot append to {path}: {e.strerror or e}; nothing was appended") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for another appender's few milliseconds
        with signals_deferred():
            start = os.lseek(fd, 0, os.SEEK_END)
            if start and readable and os.pread(fd, 1, start - 1) != b"\n":
                data = b"\n" + data
            try:
                done = 0
                while done < len(data):
                    written = os.write(fd, data[done:])
                    if written <= 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += written
                os.fsync(fd)
            except BaseException:
                try:
                    os.ftruncate(fd, start)  # the lock is ours: nobody appended after us
                except OSError:
                    pass
                raise
    except OSError as e:
        raise OutputError(f"cannot append to {path}: {e.strerror or e}; nothing was appended") from None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# Sampled images: a .png grid and an .npz, claimed and written as one result (sample.py, evaluate.py)
# ----------------------------------------------------------------------------------------------------------------

def check_outputs(out, force=False, flag="--out", typed=True, hold=True):
    """The .png and .npz an output name stands for, checked and claimed before any work (claim): refused if
    either exists (without --force) or another process is writing it right now. `typed`: the user gave `flag` (a
    default name's refusal names the file and --force only); `hold` False checks without claiming (torchrun's ranks
    other than 0, which never write)."""
    if typed:
        check_name(out, flag)
        if out.endswith(os.sep) or os.path.isdir(out):
            raise UsageError(f"{flag}: {out} is a folder; give a name without extension, e.g. "
                             f"{os.path.join(out, 'samples')}")
    return claim([out + ".png", out + ".npz"], flag, force, typed, hold)


def save_samples(images, labels, out, nrow=None, grid=None, extra=None, force=False):
    """out.png (a grid) and out.npz (`x` uint8 [N, H, W, C], `y` int64 [N] when labelled), written as a pair: both
    or neither (write: temporaries, fsynced, then named; a full disk or an interrupt leaves nothing), and
    never over an existing file unless `force`.

    The .npz is what FID tools read (evaluate.py; OpenAI's evaluator reads the same layout). `grid` (uint8
    [M, H, W, C]) replaces the images in the PNG only (sample.py --edit shows the input and mask beside them);
    `extra` adds arrays to the .npz.
    """
    import torchvision.utils  # noqa: PLC0415

    # the PNG is data.save_grid's picture (uint8 -> [0, 1], small images enlarged, a full grid by default), written
    # to an open file
    picture = data.readable(torch.from_numpy(images if grid is None else grid).permute(0, 3, 1, 2).float() / 255.0)
    columns = nrow if nrow is not None else data.grid_columns(picture.shape[0])
    arrays = {"x": images} if labels is None else {"x": images, "y": labels}
    arrays.update(extra or {})
    png, npz = write({
        out + ".png": lambda f: torchvision.utils.save_image(picture, f, nrow=columns, format="png"),
        out + ".npz": lambda f: np.savez(f, **arrays),
    }, force)
    return png, npz


@dataclasses.dataclass
class Samples:
    """What a sample.py experiment made: the images of the .npz (and their labels), the grid of the .png (default:
    the images, `nrow` to a row), extra arrays for the .npz, and how to describe both files in their `wrote` lines
    (`next`: the command to run next, with {png} and {npz})."""
    images: np.ndarray
    labels: np.ndarray = None
    nrow: int = None
    grid: np.ndarray = None
    extra: dict = None
    png_what: str = ""
    npz_what: str = ""
    next: str = None


def write_samples(result, out, force=False):
    """out.png and out.npz of a Samples (save_samples), each announced in its one line, then what to do next."""
    png, npz = save_samples(result.images, result.labels, out, result.nrow, grid=result.grid, extra=result.extra,
                            force=force)
    wrote(png, result.png_what)
    wrote(npz, result.npz_what)
    if result.next:
        say("next: " + result.next.format(png=png, npz=npz))
    return png, npz
