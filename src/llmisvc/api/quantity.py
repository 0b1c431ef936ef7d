"""Kubernetes resource quantities ("500m", "4Gi", "1.5", 2) parsed to numbers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
            "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
            "P": Decimal("1e15"), "E": Decimal("1e18")}
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))((?:[eE][+-]?[0-9]+)|Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]?)$")


def parse_quantity(value: str | int | float) -> Decimal:
    """Return the numeric value of a Kubernetes quantity (`"500m"` -> 0.5, `"1Gi"` -> 1073741824).

    Raises ValueError when `value` is not a quantity in Kubernetes' format.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity {value!r}")
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"invalid quantity {value!r}: expected a number with an optional suffix "
                         "(m, k, M, G, Ki, Mi, Gi, ...)")
    number, suffix = match.groups()
    try:
        base = Decimal(number)
        if suffix in _BINARY:
            return base * _BINARY[suffix]
        if suffix in _DECIMAL:
            return base * _DECIMAL[suffix]
        return base * (Decimal(10) ** int(suffix[1:]))
    except (InvalidOperation, ArithmeticError) as exc:
        # Exponents beyond Decimal's range raise Overflow, an ArithmeticError.
        raise ValueError(f"invalid quantity {value!r}: number out of range") from exc
