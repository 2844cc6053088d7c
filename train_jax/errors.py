"""The project exception of the training stage: bad input, reported by the CLI as a one-line ``error: ...``."""


class TrainError(Exception):
    """Bad settings, data or outputs; the message names the value or file and says what to do."""
