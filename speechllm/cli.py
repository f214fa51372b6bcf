"""Command-line plumbing: a mistake in the user's input (data, paths, model names, options) ends the command with
one line on stderr and a non-zero exit, not a traceback; real bugs still show theirs."""

import contextlib
import sys


@contextlib.contextmanager
def user_errors(*error_types: type[BaseException]):
    """Around a step whose errors of these types can only come from what the user gave it."""
    try:
        yield
    except error_types as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
