import json
import math

import pytest

from jaxgen import strict_json


def test_non_finite_numbers_become_null_at_any_depth():
    value = {"loss": math.nan, "rates": [1.5, math.inf, (-math.inf, 2)], "name": "nan", "steps": 3, "ok": True}
    assert strict_json.finite_or_null(value) == {"loss": None, "rates": [1.5, None, [None, 2]], "name": "nan",
                                                 "steps": 3, "ok": True}
    text = strict_json.dumps(value, indent=2)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["rates"] == [1.5, None, [None, 2]]


def test_what_it_cannot_write_is_still_an_error():
    with pytest.raises(TypeError):
        strict_json.dumps({"path": object()})
