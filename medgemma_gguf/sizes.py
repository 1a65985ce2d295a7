"""Sizes in bytes: read from what people write (``6GiB``, ``2.6GB``) and written for people."""

from __future__ import annotations

import re

from medgemma_gguf.errors import UserError

MiB = 1024**2
GiB = 1024**3

_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.IGNORECASE)


def parse_size(text: str, what: str | None = None) -> int:
    """Bytes in a size such as ``"6GiB"``, ``"6GB"``, ``"6000MB"``, ``"512MiB"`` (KiB/MiB/GiB/TiB are
    powers of 1024, KB/MB/GB/TB powers of 1000); UserError for anything else, naming ``what`` (a
    ``setting()``) when given."""
    match = _SIZE_PATTERN.match(str(text))
    hint = "write a number and a unit, e.g. 6GiB, 6GB, 6000MB or 512MiB"
    where = f"{what}: " if what else ""
    if match is None:
        raise UserError(f"{where}cannot read the size {text!r}; {hint}")
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise UserError(f"{where}unknown size unit {unit!r} in {text!r}; {hint}")
    size = int(float(number) * factor)
    if size <= 0:
        raise UserError(f"{where}the size {text!r} must be more than 0 bytes; {hint}")
    return size


def format_size(n_bytes: int) -> str:
    """``n_bytes`` in MiB or GiB for people."""
    if abs(n_bytes) >= GiB:
        return f"{n_bytes / GiB:.2f} GiB"
    return f"{n_bytes / MiB:.0f} MiB"
