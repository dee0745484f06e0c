"""One rule for numeric tolerances in the suite, derived from the dtype.

A computed value x matches its reference r when |x - r| <= atol + rtol |r|, with
rtol = atol = ULPS x eps(dtype): float32 84 x 1.19e-7 = 1e-5, bfloat16 84 x 7.8e-3 (used only
for values that are themselves stored in that dtype). Quantities that sum N terms (spans,
position-weighted sums) pass `terms=N`: the bound grows with sqrt(N) (random rounding).
Tests that need a different bound state the reason where they call `tolerance(..., scale=)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ULPS = 84


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


def tolerance(dtype: torch.dtype = torch.float32, scale: float = 1.0,
              terms: int = 1) -> Tolerance:
    """(rtol, atol) for values computed in `dtype` (see the module docstring)."""
    eps = torch.finfo(dtype).eps
    bound = ULPS * eps * scale * math.sqrt(max(terms, 1))
    return Tolerance(rtol=bound, atol=bound)


def assert_close(actual, expected, dtype: torch.dtype = torch.float32, scale: float = 1.0,
                 terms: int = 1, msg: str | None = None) -> None:
    """torch.testing.assert_close with the suite's dtype rule; `expected` may be float64."""
    tol = tolerance(dtype, scale, terms)
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected).to(actual.dtype if actual.is_floating_point()
                                            else expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, msg=msg)
