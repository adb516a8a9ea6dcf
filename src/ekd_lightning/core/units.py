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
