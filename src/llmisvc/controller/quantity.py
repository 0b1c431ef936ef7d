"""Kubernetes resource quantities ("500m", "2", "512Mi", "1G") as plain numbers."""

from __future__ import annotations

import re

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)$")

# Binary (Ki, Mi, ...) and decimal (k, M, ...) suffixes of the Kubernetes quantity format.
_SUFFIX = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


class QuantityError(ValueError):
    """A resource quantity that does not follow the Kubernetes quantity format."""


def parse_quantity(value: object) -> float:
    """Convert a quantity such as `"500m"`, `2` or `"4Gi"` to a float in base units.

    Raises QuantityError for anything else, including negative numbers.
    """
    if isinstance(value, bool):
        raise QuantityError(f"invalid quantity {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise QuantityError(f"invalid quantity {value!r}: must be >= 0")
        return float(value)
    match = _QUANTITY.match(str(value).strip())
    if match is None or match.group(2) not in _SUFFIX:
        raise QuantityError(f"invalid quantity {value!r}: expected a number with an optional suffix such as m, Mi or Gi")
    return float(match.group(1)) * _SUFFIX[match.group(2)]
