"""Errors, and the exit code the command line gives each (0 done, 1, 2, 3).

Every message is one line that names the file, node or layer and says what to do.
"""


class LrqError(Exception):
    """A problem with the user's input or request (exit 2)."""

    exit_code = 2


class VerificationError(LrqError):
    """The rewritten model's outputs differ from the original's by more than allowed (exit 1)."""

    exit_code = 1


class PassError(LrqError):
    """A pass refused its input; the message names the pass and the passes that ran before it (exit 2)."""


class InternalError(Exception):
    """A bug inside lrqgraph: an unexpected exception in a pass (exit 3). The message names the pass;
    the original exception is chained as ``__cause__`` for ``--debug``."""

    exit_code = 3
