"""The one exception type for user errors.

The CLI prints a :class:`NormswapError` as a single line on stderr and exits
with code 2 (``--debug`` shows the traceback).  Exit code 1 is reserved for
"ran, but a check failed" (for example ONNX parity).
"""

from __future__ import annotations


class NormswapError(Exception):
    """A user error: bad input file, bad option, impossible request.

    The message must be one line, name the problem and, where possible, say
    what to do instead.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
