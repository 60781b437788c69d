"""Errors a user can fix. The CLI prints them without a traceback and exits 2."""


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
