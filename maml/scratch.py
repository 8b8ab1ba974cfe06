"""
Files a process writes under a name holding its pid before renaming them into place (downloads,
extractions, caches), shared by both loaders: those of a process killed midway are removed by the
next run, while a live process's stay, so concurrent runs on one folder do not disturb each other.
"""
import os
import shutil


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's process
        return True
    return True


def remove_orphans(folder, pid_of):
    """Delete each entry of folder whose writer is gone: pid_of(name) gives the pid in its name
    (None: not scratch, kept); a pid that is not a number counts as gone."""
    for name in os.listdir(folder):
        pid = pid_of(name)
        if pid is not None and not (pid.isdigit() and process_exists(int(pid))):
            path = os.path.join(folder, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
