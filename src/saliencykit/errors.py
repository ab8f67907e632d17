"""The one exception type users need to catch."""


class SaliencyError(ValueError):
    """Bad input or a request that cannot be met; the message names the problem."""


def positive_int(value, what: str, minimum: int = 1) -> int:
    """`value` as an int >= `minimum` (counts and sizes: steps, samples, masks, cells, batch sizes).

    An integral float such as 64.0 is taken as 64; a bool, a fraction or a string is refused by name.
    """
    import math

    import numpy as np

    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SaliencyError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def positive_float(value, what: str, allow_zero: bool = False) -> float:
    """`value` as a finite float > 0 (or >= 0 with `allow_zero`: noise levels); a bool is refused."""
    import math

    import numpy as np

    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
            or not math.isfinite(float(value)) or value < 0 or (value == 0 and not allow_zero)):
        bound = ">= 0" if allow_zero else "> 0"
        raise SaliencyError(f"{what} must be a finite number {bound}, got {value!r}")
    return float(value)


def resolve_seed(seed) -> int:
    """The seed a call runs with: an int >= 0 as given; None draws a fresh one from the operating
    system's entropy (recorded like a given one, so the run can be repeated); anything else is refused."""
    import secrets

    import numpy as np

    if seed is None:
        return secrets.randbits(31)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SaliencyError(f"seed must be an integer >= 0 or None (a fresh seed), got {seed!r}")
    return int(seed)
