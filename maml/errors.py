"""
The problems this project names: bad flags, missing or damaged data and checkpoints, a run that
diverges. Each is raised with one sentence that says what is wrong and how to fix it, and the
training scripts print that sentence alone; any other exception (a bug, out of memory) keeps its
traceback. Each class also derives from the builtin exception a caller would expect, so a notebook
that catches ValueError or FileNotFoundError keeps working.
"""


class UserError(Exception):
    """A problem with the user's input whose message names the fix."""


class FlagError(UserError, ValueError):
    """A flag or hyperparameter with a value the run cannot use."""


class MissingError(UserError, FileNotFoundError):
    """A data set or checkpoint that is not where it was looked for."""


class DamagedError(UserError, RuntimeError):
    """A file that exists but cannot be used: damaged, cut short, or of another kind."""


class RunError(UserError, RuntimeError):
    """A run that cannot go on as asked: diverged, or conflicting with the files of another run."""
