"""JSON that strict readers accept (jq, JavaScript, pandas' `read_json`): a non-finite number is null.

Python's `json` writes NaN and Infinity, which are not JSON; a diverged run's summary,
or a metric not known on this machine, would make its whole file unreadable to them.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float, at any depth of dicts, lists and tuples, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """`json.dumps` of `value` with non-finite numbers as null (and never NaN or Infinity in the text)."""
    return json.dumps(finite_or_null(value), allow_nan=False, **options)
