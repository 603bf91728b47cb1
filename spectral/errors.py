"""The one error type users see: bad input, reported as one line with exit status 2."""


class UsageError(ValueError):
    """Input that eigengap cannot use (a spec, a file, an argument). The message is one line
    naming the problem; the CLI prints it and exits with status 2."""
