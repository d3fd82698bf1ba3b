"""One error style for every ``m2rnn-jax`` command.

A user mistake (a bad flag or config value, a missing file or directory, hardware the machine lacks) is reported as
one line on stderr, ``m2rnn-jax <command>: error: <flag or key>: <what was expected>, got <what>``, with exit status
2 and no traceback; argparse's own errors (unknown flag, bad type) have the same prefix and status. Commands raise
``ValueError`` whose message starts with the flag or config key, catch it around the part that reads user input and
return :func:`fail`. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2


def fail(command: str, error: BaseException | str) -> int:
    """Prints ``m2rnn-jax <command>: error: <error>`` to stderr and returns the exit status :data:`EXIT_USAGE`."""
    print(f"m2rnn-jax {command}: error: {error}", file=sys.stderr, flush=True)
    return EXIT_USAGE
