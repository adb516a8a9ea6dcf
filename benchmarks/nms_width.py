"""How far normal-mode sampling stretches X-H bonds: the bundled builder's against ANI-1's.

Issue 24 asks for a sampling preset closer to ANI-1x if the bundled builder samples narrower.
This compares, on the same GFN2-xTB minima and normal modes (:mod:`ekd_lightning.bundled.build`),
the two normal-mode generators, with no energy evaluated:

* ``bundled``: the builder's harmonic Boltzmann samples, q_i ~ N(0, kT / k_i), T ~ U(200, 1000) K,
  force constants floored at 0.03 Hartree/Å², rejecting a bond outside 0.8-1.3x its length or
  atoms closer than 0.7 Å (the builder's 50 kcal/mol energy cap, which needs xTB, is left out:
  it can only narrow the bundled side further);
* ``ani1``: ANI-1's normal-mode sampling (Smith, Isayev, Roitberg, Chem. Sci. 2017, 8, 3192;
  :func:`~ekd_lightning.bundled.build.ani1_normal_mode_frames`),
  R_i = ±sqrt(3 c_i N_a k_B T / K_i) with the c_i a random partition of a random fraction of 1
  (as in its published generator), at ``--ani-temperatures`` (ANI-1: 300 K), rejecting atoms
  closer than 0.006 Z_i Z_j + 0.6 Å or moved more than 2 Å.

Per generator it prints how far X-H bonds stretch beyond their minimum length (Å): the 99th and
99.9th percentiles and the maximum, and the fraction beyond 0.3 and 0.5 Å (the MD test's failure
criterion). Models turn over at about 0.5-0.6 Å (``bond_stretch_scan.py``). A third row runs
ANI-1's generator with the builder's force-constant floor: the difference between the two is
the soft modes (torsions), which ANI-1 displaces far along their linearised direction, and a
large linear torsion displacement lengthens the bonds it swings::

    python benchmarks/nms_width.py --samples 2000
"""

from __future__ import annotations

import argparse

import numpy as np

from ekd_lightning.bundled.build import (
    KB_HARTREE,
    XtbEngine,
    ani1_normal_mode_frames,
    bonds_ok,
    embed_smiles,
    hessian,
    optimise,
    vibrational_modes,
)

MOLECULES = ("CO", "CCO", "CC=O", "CC(N)=O", "CCCC", "c1ccncc1")
"""Training molecules of the bundled set (H/C/N/O, 2-6 heavy atoms)."""


def bundled_samples(positions, bonds, k, modes, rng, n, temps=(200.0, 1000.0)) -> np.ndarray:
    """The builder's normal-mode samples (``build.normal_mode_frames``, which computes its own
    Hessian and needs xTB for its energy cap) on given modes, without the cap: (n, n_atoms, 3) Å."""
    k = np.maximum(k, 0.03)
    out = []
    while len(out) < n:
        kt = KB_HARTREE * rng.uniform(*temps)
        trial = positions + (modes @ (rng.standard_normal(len(k)) * np.sqrt(kt / k))).reshape(-1, 3)
        if bonds_ok(trial, positions, bonds):
            out.append(trial)
    return np.array(out)


def xh_stretch(frames: np.ndarray, positions: np.ndarray, numbers, bonds) -> np.ndarray:
    """Every X-H bond's length minus its length at the minimum, Å: (n_frames × n_xh,)."""
    pairs = [(i, j) for i, j in bonds if (numbers[i] == 1) != (numbers[j] == 1)]
    i, j = np.array(pairs).T
    ref = np.linalg.norm(positions[i] - positions[j], axis=-1)
    return (np.linalg.norm(frames[:, i] - frames[:, j], axis=-1) - ref).ravel()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--molecules", nargs="+", default=list(MOLECULES), help="SMILES")
    parser.add_argument("--samples", type=int, default=2000, help="per molecule and generator")
    parser.add_argument("--ani-temperatures", type=float, nargs=2, default=(300.0, 300.0),
                        metavar=("LOW", "HIGH"), help="K, uniform (ANI-1: 300 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    stretches: dict[str, list[np.ndarray]] = {}
    for smiles in args.molecules:
        numbers, positions, bonds = embed_smiles(smiles)
        engine = XtbEngine(numbers, positions)
        positions = optimise(engine, numbers, positions, 300)
        k, modes = vibrational_modes(positions, hessian(engine, positions))
        frames = {
            "bundled (200-1000 K)": bundled_samples(positions, bonds, k, modes, rng, args.samples),
            "ani1": ani1_normal_mode_frames(numbers, positions, k, modes, rng, args.samples,
                                            args.ani_temperatures),
            "ani1, bundled's floor": ani1_normal_mode_frames(
                numbers, positions, np.maximum(k, 0.03), modes, rng, args.samples,
                args.ani_temperatures),
        }
        for name, x in frames.items():
            stretches.setdefault(name, []).append(xh_stretch(x, positions, numbers, bonds))
    lo, hi = args.ani_temperatures
    print(f"{len(args.molecules)} molecules, {args.samples} samples each; ani1 at {lo:g}-{hi:g} K")
    print("generator               p99    p99.9  max    >0.3 Å   >0.5 Å  (X-H stretch, Å)")
    for name, parts in stretches.items():
        s = np.concatenate(parts)
        print(f"{name:<22} {np.percentile(s, 99):.3f}  {np.percentile(s, 99.9):.3f}  {s.max():.3f}"
              f"  {np.mean(s > 0.3):.1e}  {np.mean(s > 0.5):.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
