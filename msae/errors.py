"""User-facing errors: one line, naming the thing and what was expected; CLI exit code 2."""


class MsaeError(Exception):
    """Bad input from the user (file, argument, spec). The CLI prints it on one line and exits 2."""

    exit_code = 2

    def __str__(self) -> str:
        return " ".join(super().__str__().split())
