"""The one exception type users need to catch."""


class SaliencyError(ValueError):
    """Bad input or a request that cannot be met; the message names the problem."""
