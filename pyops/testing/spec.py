"""What every family's spec entry supplies (Spec), and the table of a family's entries (spec_table).

A family's module (activation.py, batch_norm.py, conv.py, loss.py, optim.py) defines its spec class, its
samples and its table; `pyops.testing.SPECS` lists the families, once. `python -m pyops check` reads
only what Spec states, so a new family is a new module whose class supplies it, and a line in SPECS.
"""

from typing import Callable, Protocol, runtime_checkable


@runtime_checkable
class Spec(Protocol):
    """One op (or optimizer) of a family, checked against the float64 oracle."""

    family: str  # the family's name, as pyops.testing.SPECS lists it
    name: str  # the op's (or optimizer's) name, unique in its family
    dtypes: tuple  # the dtypes its reference is an oracle for (check runs each)

    @property
    def function(self) -> Callable:
        """What is checked: the pyops function (or optimizer class)."""

    @property
    def reference(self) -> Callable:
        """torch's counterpart (function or class), run in float64 as the oracle."""

    @property
    def samples(self) -> dict:
        """label -> what `check` runs the function on (inputs, cases or configurations)."""

    def tolerance(self, dtype, reduced=1) -> tuple:
        """(rtol, atol) of a result in `dtype` summing over `reduced` elements (oracle.tolerance, scaled
        where the family's results carry more rounding)."""

    def check(self, dtype, device, seed=0) -> list:
        """Every sample on the current backend in `dtype` on `device`, against the oracle: a list of
        oracle.Comparison, each sample drawn from a generator seeded with `seed`."""


def spec_table(*specs):
    """name -> spec for a family's entries, each a Spec."""
    for spec in specs:
        if not isinstance(spec, Spec):
            raise TypeError(f"pyops.testing: {spec!r} does not supply what a Spec states")
    return {spec.name: spec for spec in specs}
