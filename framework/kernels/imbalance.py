"""Level imbalance and the shapes f(I) of the imbalance-adjusted mid, mid + spread · f(I)."""

from __future__ import annotations

from typing import Annotated, Literal

from numba import njit

from quotelab.component import Encode, Width

SHAPES: dict[str, int] = {"linear": 0, "cubic": 1, "nonic": 2, "cubic_linear": 3, "shifted": 4, "polynomial": 5}
SHAPE_FORMULAS: dict[str, str] = {
    "linear": "I/2 (the weighted mid)",
    "cubic": "I^3/2",
    "nonic": "I(I^8+1)/4",
    "cubic_linear": "I(I^2+1)/4",
    "shifted": "(I+0.3)(I^4+0.7)/3.8",
    "polynomial": "sum_j c_j I^j",
}
MAX_COEFFICIENTS = 10

# Params field types of the parts that use these kernels.
Shape = Annotated[Literal["linear", "cubic", "nonic", "cubic_linear", "shifted", "polynomial"], Encode(**SHAPES)]
# Fixed width, so changing the shape or the polynomial's degree never recompiles.
Coefficients = Annotated[tuple[float, ...], Width(MAX_COEFFICIENTS)]
EmptyLevel = Annotated[Literal["zero", "undefined"], Encode(zero=0.0, undefined=float("nan"))]
EMPTY_LEVEL_DOC = ("Imbalance of a level with no quantity on either side: 0, or undefined (NaN, as pandas' 0/0 "
                   "gives: evaluate leaves the row out and counts it).")


@njit(inline="always")
def imbalance_shape_nb(shape, imb, coefs, inner):
    """f(I); ``inner`` is the imbalance in the second factor of nonic, cubic_linear and shifted (I itself,
    except where a part weights it differently, as the seed's adjust_mid_price_8 did)."""
    if shape == 0:
        return imb / 2.0
    if shape == 1:
        return imb ** 3 / 2.0
    if shape == 2:
        return imb * (inner ** 8 + 1.0) / 4.0
    if shape == 3:
        return imb * (inner ** 2 + 1.0) / 4.0
    if shape == 4:
        return (imb + 0.3) * (inner ** 4 + 0.7) / 3.8
    total = 0.0
    power = 1.0
    for j in range(len(coefs)):
        total += coefs[j] * power
        power *= imb
    return total


@njit(inline="always")
def level_imbalance_nb(qb, qa, empty):
    """(Qb − Qa)/(Qb + Qa); ``empty`` (0, or NaN for undefined as pandas' 0/0) on an empty level."""
    s = qb + qa
    return (qb - qa) / s if s > 0.0 else empty
