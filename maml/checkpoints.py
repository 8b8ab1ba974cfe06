"""
The files of one training run, written so that nothing is ever lost or half-written.

    run = RunDir('checkpoints', keep=3)   # locks the folder for this process, until run.close()
    run.save(maml.checkpoint(step=500, acc=0.95, ...), row={'step': 500, 'val_acc': 0.95, ...})
    run.rollback(step)                    # on --resume: forget what came after last.pth's step

A run folder holds
    maml_step{step}_acc{acc:.4f}.pth   the top `keep` evaluations by accuracy
    best.pth                           a copy of the best of them
    last.pth                           the latest evaluation, to --resume from
    metrics.csv                        one row per evaluation
    learning_curve.png                 metrics.csv drawn by plot.py (when matplotlib is installed)
    .lock                              held (flock) by the run writing here

last.pth is the commit point of an evaluation: the ranked file, best.pth and the metrics row are
written first and last.pth after them, and a displaced ranked file is deleted only after that. A
kill at any moment therefore leaves last.pth at or behind everything else, and `rollback` removes
what an uncommitted evaluation left. Every file goes through a temporary name, fsync and rename.
"""
import csv
import fcntl
import os
import pickle
import re
import shutil

import torch
from torch.utils._pytree import tree_flatten

from .errors import DamagedError, FlagError, MissingError, RunError

RANKED = re.compile(r'^maml_step(\d+)_acc(\d+\.\d+)\.pth$')
OWN_TEMPORARY = re.compile(r'^(best\.pth|last\.pth|metrics\.csv|maml_step\d+_acc\d+\.\d+\.pth)\.tmp$')
# what torch.load's RuntimeErrors say when the archive itself is cut short or corrupt
ARCHIVE_DAMAGE = ('PytorchStreamReader', 'inline_container', 'zip archive')


def atomic_save(obj, path):
    """torch.save to path.tmp, flushed to disk, then renamed over path."""
    with open(path + '.tmp', 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)


def damaged(path, error):
    return DamagedError(f"Checkpoint {path} cannot be read ({type(error).__name__}); the file is damaged "
                        f"or not a MAML checkpoint, so load another one such as best.pth.")


def load_checkpoint(path, map_location=None):
    """torch.load with weights_only=True, and one clear sentence for a missing or damaged file.
    On a machine without CUDA, tensors saved on a GPU are loaded onto the CPU."""
    if map_location is None and not torch.cuda.is_available():
        map_location = 'cpu'
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise MissingError(f"Checkpoint {path} does not exist; check the path.") from None
    except IsADirectoryError:
        raise MissingError(f"{path} is a folder, not a checkpoint; pass a .pth file in it, such as "
                           f"{os.path.join(path, 'best.pth')}.") from None
    except PermissionError:
        raise MissingError(f"Checkpoint {path} cannot be opened by this user (permission denied); "
                           f"change its permissions or copy it.") from None
    except RuntimeError as e:
        if 'deserialize object on' in str(e):   # saved on a GPU this machine does not have
            raise FlagError(f"Checkpoint {path} holds tensors saved on a GPU this machine lacks ({e}); "
                            f"load it with map_location='cpu' or onto a GPU you have, e.g. 'cuda:0'.") from None
        if not any(sign in str(e) for sign in ARCHIVE_DAMAGE):
            raise   # out of memory, a bug: not the file's fault, so the traceback stays
        raise damaged(path, e) from None
    except (pickle.UnpicklingError, EOFError, KeyError, OSError) as e:
        raise damaged(path, e) from None
    if not isinstance(ckpt, dict) or not {'model', 'config', 'hparams'} <= ckpt.keys():
        raise DamagedError(f"Checkpoint {path} is not a MAML checkpoint of this project (it lacks "
                           f"model/config/hparams); load one written by the training scripts.")
    return ckpt


def portable_path(text):
    """`text` with the paths of this machine written as another machine can read them: the home
    folder as ~ and the working folder's contents relative to it (a report or shipped checkpoint
    does not carry where it happened to run)."""
    home, here = os.path.expanduser('~'), os.getcwd()
    text = text.replace(here + os.sep, '').replace(here, '.')
    return text.replace(home + os.sep, '~' + os.sep) if home not in ('', os.sep) else text


def check_finite(ckpt, step):
    """Refuse to save weights that are not all finite (a diverged run must not overwrite good files):
    the net's and the family's meta-parameters and running statistics."""
    tensors = tree_flatten([ckpt['model'], ckpt.get('family', {}).get('extras', {})])[0]
    bad = sum(int((~t.isfinite()).sum()) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())
    if bad:
        raise RunError(f"The meta-parameters hold {bad} non-finite values at step {step}, so nothing was "
                       f"saved; lower --meta_lr or --update_lr, or set --grad_clip, and resume from last.pth.")


def read_metrics(folder, name='metrics.csv'):
    """A run folder's metrics.csv (or another such file of `folder`) as a list of dicts (empty when
    there is none yet)."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def stored(path, key, fallback):
    """checkpoint[key] of the file at path, or `fallback` when the file is damaged."""
    try:
        return load_checkpoint(path, map_location='cpu')[key]
    except DamagedError:
        return fallback


class RunDir:
    """The run folder `save_dir`, locked (flock on .lock) until `close`, or the end of a `with` block."""

    def __init__(self, save_dir, keep):
        self.dir, self.keep = save_dir, keep
        try:
            os.makedirs(save_dir, exist_ok=True)
            self._lock = open(self.path('.lock'), 'a+')
        except OSError as e:
            raise RunError(f"--save_dir {save_dir} cannot hold a run ({e.strerror}); pass a folder this "
                           f"user can write to.") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RunError(f"Another run is writing to {save_dir}; wait for it to end or pass another "
                           f"--save_dir.") from None
        try:
            for name in os.listdir(save_dir):
                if OWN_TEMPORARY.match(name):   # left by a kill between write and rename
                    os.remove(self.path(name))
            # ranked by the accuracy each file stores: the names round it to 4 digits
            self.ranked = sorted(((float(stored(self.path(f), 'acc', float(m[2]))), int(m[1]), self.path(f))
                                  for f in os.listdir(save_dir) if (m := RANKED.match(f))), reverse=True)
        except BaseException:
            self.close()   # no RunDir comes back to close, so the folder must not stay locked
            raise

    def path(self, name):
        return os.path.join(self.dir, name)

    def close(self):
        """Release the folder to the next run; closing again does nothing."""
        self._lock.close()   # releases the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def has_checkpoints(self):
        return bool(self.ranked) or any(os.path.exists(self.path(f)) for f in ('best.pth', 'last.pth'))

    def is_empty(self):
        return not self.has_checkpoints() and not os.path.exists(self.path('metrics.csv'))

    def holds(self, path):
        """Whether `path` is a file of this run folder."""
        return os.path.realpath(os.path.dirname(path)) == os.path.realpath(self.dir)

    def save(self, ckpt, row):
        """Record one evaluation: ckpt holds 'step' and 'acc'; row is its metrics.csv line. A failed
        write (a full disk) ends the run in one sentence; last.pth still holds the previous evaluation."""
        check_finite(ckpt, ckpt['step'])
        try:
            self._save(ckpt, row)
        except OSError as e:
            last = self.path('last.pth')
            then = (f"resume from {last}, which is complete" if os.path.exists(last) else
                    "start again: nothing of this run had been saved yet")
            raise RunError(f"writing to {self.dir} failed at step {ckpt['step']} ({e.strerror or e}); make room "
                           f"there and {then}.") from None

    def _save(self, ckpt, row):
        step, acc = ckpt['step'], ckpt['acc']
        enters = len(self.ranked) < self.keep or acc > self.ranked[-1][0]
        if enters:
            path = self.path(f'maml_step{step}_acc{acc:.4f}.pth')
            atomic_save(ckpt, path)
            if not self.ranked or acc > self.ranked[0][0]:
                atomic_save(ckpt, self.path('best.pth'))
            self.ranked = sorted(self.ranked + [(acc, step, path)], reverse=True)
        self._append_row(row)
        atomic_save(ckpt, self.path('last.pth'))
        for _, _, dropped in self.ranked[self.keep:]:
            os.remove(dropped)
        self.ranked = self.ranked[:self.keep]

    def rollback(self, step):
        """Forget every evaluation after `step` (those whose last.pth was never written)."""
        for entry in [e for e in self.ranked if e[1] > step]:
            os.remove(entry[2])
            self.ranked.remove(entry)
        best = self.path('best.pth')
        if os.path.exists(best) and stored(best, 'step', float('inf')) > step:   # a damaged one is replaced
            if self.ranked:
                shutil.copyfile(self.ranked[0][2], best + '.tmp')
                os.replace(best + '.tmp', best)
            else:
                os.remove(best)
        rows = self.rows()
        if any(int(r['step']) > step for r in rows):
            self._write_rows([r for r in rows if int(r['step']) <= step], fields=list(rows[0]))

    def adopt_metrics(self, other_dir, step):
        """Start this (empty) folder's metrics.csv with another run folder's rows up to `step`, for a
        run resumed from a checkpoint of `other_dir` into a new --save_dir."""
        rows = [r for r in read_metrics(other_dir) if int(r['step']) <= step]
        if rows:
            self._write_rows(rows, fields=list(rows[0]))
        elif os.path.exists(self.path('metrics.csv')):
            os.remove(self.path('metrics.csv'))

    def rows(self):
        return read_metrics(self.dir)

    def _append_row(self, row):
        rows = self.rows()
        self._write_rows(rows + [row], fields=list(rows[0]) if rows else list(row))

    def _write_rows(self, rows, fields):
        path = self.path('metrics.csv')
        with open(path + '.tmp', 'w', newline='') as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + '.tmp', path)
