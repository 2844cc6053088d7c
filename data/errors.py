"""The one exception the data package raises."""


class DataError(Exception):
    """Bad dataset input: the message is one line naming the path or value and the fix."""
