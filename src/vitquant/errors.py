"""One exception type for every user-facing failure: the CLI prints its message as one line and exits 2."""


class VitquantError(Exception):
    """A problem with the user's input (path, data, bits, model) whose message names the thing and the fix."""


class UncalibratedError(VitquantError):
    """A quantizer was used before its range was set: vitquant never guesses a scale."""
