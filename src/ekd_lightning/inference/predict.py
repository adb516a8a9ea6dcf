"""``ekd-predict model.ckpt [more.ckpt ...] in.xyz --out out.extxyz``: energies and forces of
your own molecules.

The input is any file ASE reads (xyz, extxyz, sdf, pdb, ...; every frame), the output is written
by ASE (extxyz by its extension: ``ase.io.read(out, ":")`` gives the results back). Per
structure:

- ``energy`` (eV) and ``forces`` (n_atoms, 3) eV/Å as ASE results (``atoms.get_potential_energy()``,
  ``atoms.get_forces()`` after reading), ``info["energy_hartree"]`` (Hartree);
- with several models (checkpoints, run folders or a published ensemble, as distillation takes
  its teachers) the ensemble mean, and as an uncertainty ``info["energy_std"]`` (eV) and the
  per-atom ``arrays["forces_std"]`` (n_atoms, 3) eV/Å: standard deviations over the members.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ..core.errors import DataError, EKDError
from ..core.files import write_atomic
from ..core.outputs import check_writable, refuse_overwrite, user_error_line
from ..core.units import HARTREE_TO_EV
from .calculator import check_structure


def read_structures(path: str | Path, index: str = ":", fmt: str | None = None) -> list[Atoms]:
    """Every structure of an ASE-readable file; DataError naming the file if it cannot be read."""
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such structure file")
    try:
        frames = ase.io.read(path, index=index, format=fmt)
    except Exception as exc:  # ASE raises many types for a file it cannot parse
        raise DataError(f"{path}: ASE cannot read structures from it ({type(exc).__name__}: {exc}); "
                        "give a file ASE reads (xyz, extxyz, sdf, pdb, ...), naming its format "
                        "with --format if the extension does not") from exc
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise DataError(f"{path}: no structures in the file (index {index!r})")
    return frames


def predict_structures(calculator, frames: Sequence[Atoms], source: str = "input") -> list[Atoms]:
    """Copies of ``frames`` with the calculator's results (see the module docstring for keys).

    Raises DataError naming ``source`` and the structure for an element the model does not know
    or a periodic cell.
    """
    known = calculator.elements
    out = []
    for k, atoms in enumerate(frames):
        unknown = sorted(set(atoms.get_chemical_symbols()) - set(known))
        if unknown:
            raise DataError(
                f"{source}: structure {k} ({atoms.get_chemical_formula()}) has element(s) {unknown} "
                f"that the model does not know (it knows {known}); remove those structures or "
                "use a model trained on them")
        check_structure(atoms, f"{source}: structure {k} ({atoms.get_chemical_formula()})")
        result = atoms.copy()
        result.calc = calculator
        try:
            energy, forces = result.get_potential_energy(), result.get_forces()
        except DataError as exc:
            raise DataError(f"{source}: structure {k}: {exc}") from exc
        result.calc = SinglePointCalculator(result, energy=energy, forces=forces)
        result.info["energy_hartree"] = energy / HARTREE_TO_EV
        if "energy_std" in calculator.results:
            result.info["energy_std"] = calculator.results["energy_std"]
            result.arrays["forces_std"] = calculator.results["forces_std"].copy()
        out.append(result)
    return out


def write_structures(frames: Sequence[Atoms], path: str | Path, fmt: str | None = None) -> None:
    """``ase.io.write`` of ``frames`` to ``path``, atomically (temporary file, then rename)."""
    import ase.io
    from ase.io.formats import filetype, ioformats

    path = Path(path)
    fmt = fmt or filetype(path, read=False)
    if ioformats[fmt].isbinary:
        write_atomic(path, lambda handle: ase.io.write(handle, frames, format=fmt))
    else:
        text = io.StringIO()
        ase.io.write(text, frames, format=fmt)
        write_atomic(path, lambda handle: handle.write(text.getvalue().encode()))


def load_calculator(models: Sequence[str], **kwargs):
    """The calculator of one checkpoint file, or of an ensemble (several entries, or a run
    folder or published ensemble name, see :meth:`EKDCalculator.from_checkpoints`)."""
    from .calculator import EKDCalculator

    if len(models) == 1 and not Path(models[0]).is_dir() and not models[0].startswith("torchani_"):
        return EKDCalculator.from_checkpoint(models[0], **kwargs)
    return EKDCalculator.from_checkpoints(list(models), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ekd-predict",
        description="Energies (eV and Hartree) and forces (eV/Å) of the structures in a file, "
        "from one model or the mean and spread of several.")
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="checkpoint(s) (.ckpt), run folder(s) or a published ensemble "
                        "(torchani_ani2x); several: ensemble mean and spread")
    parser.add_argument("structures", help="structure file ASE reads (xyz, extxyz, sdf, ...)")
    parser.add_argument("--out", required=True, help="output file, e.g. out.extxyz")
    parser.add_argument("--format", help="ASE format of the input if its extension does not say")
    parser.add_argument("--out-format", help="ASE format of the output (default: by extension)")
    parser.add_argument("--index", default=":", help="which frames (ASE index, default all)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        refuse_overwrite(args.out, args.force)
        check_writable(Path(args.out).parent, 0, "output")
        frames = read_structures(args.structures, args.index, args.format)
        calculator = load_calculator(args.models, device=args.device)
        results = predict_structures(calculator, frames, args.structures)
        write_structures(results, args.out, args.out_format)
    except (EKDError, OSError) as exc:
        message = user_error_line(exc)
        if message is None:
            raise
        print(f"ekd-predict: error: {message}", file=sys.stderr)
        return 2
    spread = ", energy_std (eV), forces_std (eV/Å)" if len(calculator.members) > 1 else ""
    print(f"wrote {len(results)} structure(s) to {args.out}: energy (eV), energy_hartree, "
          f"forces (eV/Å){spread}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
