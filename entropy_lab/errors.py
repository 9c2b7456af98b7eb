"""One exception type for bad input, so the CLI can print it as a single line."""


class EntropyLabError(ValueError):
    """Bad input or configuration. The message is one complete sentence for the user."""
