"""Errors a user can act on: one line that names the file or node and says what to do."""


class LrqError(Exception):
    """A problem with the user's input or request; the CLI prints it on one line and exits 2."""


class PassError(LrqError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class VerificationError(LrqError):
    """The rewritten model's outputs differ from the original's by more than allowed."""
