"""The one exception the extraction stage raises for bad input."""


class ExtractError(Exception):
    """Bad extraction input: the message is one line naming the file or value and what to do."""


def unreadable(e: OSError | UnicodeDecodeError) -> str:
    """Why a text file could not be read, in a few words."""
    return "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e.strerror or e)
