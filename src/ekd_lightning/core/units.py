"""Units and elements.

Datasets store energies in Hartree, coordinates in Å and forces in Hartree/Å; the code works in
those units internally. Reports use kcal/mol and kcal/mol/Å, ASE uses eV and eV/Å.
"""

from ase.data import atomic_numbers as _ASE_NUMBERS
from ase.data import chemical_symbols as _ASE_SYMBOLS
from ase.units import Hartree as _HARTREE_EV
from ase.units import kcal as _KCAL
from ase.units import mol as _MOL

HARTREE_TO_EV: float = float(_HARTREE_EV)
"""1 Hartree in eV (27.2114 eV)."""
HARTREE_TO_KCALMOL: float = float(_HARTREE_EV / (_KCAL / _MOL))
"""1 Hartree in kcal/mol (627.509 kcal/mol)."""


def symbol_to_number(symbol: str) -> int:
    """Atomic number of an element symbol ('C' -> 6); KeyError for an unknown symbol."""
    return _ASE_NUMBERS[symbol]


def number_to_symbol(number: int) -> str:
    """Element symbol of an atomic number (6 -> 'C')."""
    return _ASE_SYMBOLS[int(number)]


SELF_ENERGY_RANGE: dict[str, tuple[float, float]] = {
    "H": (0.2, 1.0), "C": (0.8, 80.0), "N": (1.0, 110.0), "O": (1.5, 150.0),
    "F": (2.0, 200.0), "S": (1.5, 800.0), "Cl": (2.0, 920.0),
}
"""Magnitude (Hartree) a fitted self energy of each element takes in Hartree data: from half a
valence-only method's (GFN2-xTB: H -0.39, C -1.8 Ha) to twice an all-electron one's (DFT:
H -0.50, C -37.8, Cl -460 Ha). Data of relative energies (atomization energies) fall below
and are fine; above means another unit."""

OTHER_UNITS: dict[str, float] = {"eV": HARTREE_TO_EV, "kcal/mol": HARTREE_TO_KCALMOL,
                                 "kJ/mol": HARTREE_TO_KCALMOL * 4.184}
"""Energy units a dataset may hold by mistake, and their size in Hartree (1 Ha = value)."""


def implausible_unit(elements, self_energies) -> str | None:
    """Why self energies (Hartree per atom, fitted on a dataset, one per element) do not look
    like Hartree, naming the likely unit (``"... look like kcal/mol ..."``); None when they do
    (or no element has a known range, :data:`SELF_ENERGY_RANGE`)."""
    known = [(e, abs(float(s))) for e, s in zip(elements, self_energies, strict=True)
             if e in SELF_ENERGY_RANGE]
    too_big = [(e, s) for e, s in known if s > SELF_ENERGY_RANGE[e][1]]
    if not too_big:
        return None

    def fits(factor: float) -> int:
        return sum(SELF_ENERGY_RANGE[e][0] <= s / factor <= SELF_ENERGY_RANGE[e][1] for e, s in known)

    unit, factor = max(OTHER_UNITS.items(), key=lambda item: (fits(item[1]), -item[1]))
    element, value = too_big[0]
    low, high = SELF_ENERGY_RANGE[element]
    return (f"the energies look like {unit}, not Hartree: the fitted self energy of {element} "
            f"is {value:.4g} per atom where Hartree data give {low:g} to {high:g}; convert them "
            f"to Hartree (divide by {factor:.6g})")
