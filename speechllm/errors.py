"""Errors in what the user gave (data, paths, model names, options), and how a command line reports them."""

import contextlib
import os
import sys


class InputError(ValueError):
    """Something wrong in the user's input; its message says what and where (file, jsonl line, option)."""


@contextlib.contextmanager
def user_errors(*error_types: type[BaseException]):
    """Around a command-line step whose errors of these types can only come from what the user gave it: they end the
    command with one line on stderr and exit status 1, no traceback; any other exception is a bug and keeps its."""
    try:
        yield
    except error_types as error:
        message = str(error).strip()
        if "\nOriginal Traceback" in message:  # re-raised from a DataLoader worker, the worker's traceback in front
            message = message.splitlines()[-1].split(": ", 1)[-1]
        print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def run_command_line(main, argv: list[str] | None = None):
    """Run main(argv) for a command line, an InputError anywhere in it reported as user_errors does."""
    with user_errors(InputError):
        return main(argv)
