"""The one exception the extraction stage raises for bad input."""


class ExtractError(Exception):
    """Bad extraction input: the message is one line naming the file or value and what to do."""
