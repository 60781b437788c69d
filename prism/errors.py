"""Errors and exit codes of the `prism` command.

exit 0: done. exit 2 (`UserError`): bad input the user can fix (a file, a config value, a model directory); the CLI
prints one line naming what to fix, no traceback. exit 1: the run failed for another reason: `TrainingAborted`
(a deliberate stop, e.g. too many non-finite steps; one line, the last good checkpoint is kept) or any other
exception (an internal error: a short line plus the traceback, for a bug report).
"""

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2


class UserError(Exception):
    """Bad input from the user (file, config, model directory): exit code 2."""


class DataFormatError(UserError):
    """A data file that does not follow its schema. Names the file, the record and the field."""

    def __init__(self, path, problem: str, index: int | None = None, field: str | None = None):
        self.path, self.index, self.field, self.problem = str(path), index, field, problem
        where = str(path)
        if index is not None:
            where += f", record {index}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")


class TrainingAborted(RuntimeError):
    """A run stopped on purpose because continuing would be meaningless (e.g. a run of non-finite losses): exit 1
    with the message and no traceback. Checkpoints already written are kept."""
