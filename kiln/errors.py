"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class KilnError(Exception):
    """A problem with the user's input (spec, shape, config, file), not a bug in kiln.

    The message is one line that names the problem and, where it helps, what is accepted.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what the interrupted work left behind: the CLI prints
    `kiln: interrupted: MESSAGE` and exits 130, like every other interruption."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, shortened: for wrapping foreign errors."""
    text = str(exc).strip() or type(exc).__name__
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."
