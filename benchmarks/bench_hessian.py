"""Cost of the Hessian-vector-product term (``loss.hessian``, ekd_lightning.distill.hessian) in a student's
training step: the plain step (energy + forces, backward, AdamW) against the same step with the
term on a fraction of each batch's molecules, `ani2x`, batches of 64 bundled conformations,
alternating rounds (benchlib.alternate); prints ms/step and the ratio to the plain step.

    python benchmarks/bench_hessian.py [--hvp <store>/hvp-<sha>.h5] [--rounds 11]

Without --hvp the HVP labels come from one untrained `ani2x` (the step's cost does not depend
on the label values); the force target is the data's forces (the same cost as distilled ones).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from benchlib import alternate, machine_line, median, table

from ekd_lightning.bundled import DATA_DIR
from ekd_lightning.data import EKDDataModule
from ekd_lightning.distill.hessian import hvp_labels, write_hvp_labels
from ekd_lightning.task.module import ENERGY_ONLY, PotentialModule

ANI2X = {"_target_": "ekd_lightning.models.ani.ANIModel", "name": "ani2x"}
FORCES = {"_target_": "ekd_lightning.losses.ForceLoss", "target": "reference", "weight": 0.1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hvp", help="HVP label file of the bundled data (default: made here)")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 1.0])
    args = parser.parse_args()
    torch.manual_seed(0)
    dm = EKDDataModule(str(DATA_DIR / "xtb_train.h5"), "gfn2_xtb.energy", "gfn2_xtb.forces",
                       file_format="ani1x", batch_size=64)
    dm.setup()
    hvp = args.hvp
    if hvp is None:
        torch.manual_seed(0)
        teacher = PotentialModule(ANI2X, dm.elements, dm.self_energies.tolist(), dm.energy_scale).model.eval()
        groups = hvp_labels([teacher], dm.records, {r.key: int(r.conf_index.max()) + 1 for r in dm.records},
                            k=4, seed=0, kind="rows")
        hvp = write_hvp_labels(Path(tempfile.mkdtemp()) / "hvp.h5", groups, {"kind": "rows"})
    losses = {"plain": {}, **{f"hessian, fraction {f}": {"hessian": {
        "_target_": "ekd_lightning.distill.hessian.HessianLoss", "labels": str(hvp), "weight": 1e-3,
        "fraction": f}} for f in args.fractions}}
    modules = {}
    for name, extra in losses.items():
        torch.manual_seed(0)
        modules[name] = PotentialModule(ANI2X, dm.elements, dm.self_energies.tolist(), dm.energy_scale,
                                        stage="student", loss={"energy": ENERGY_ONLY, "forces": FORCES, **extra})
        for term in modules[name].loss_terms.values():
            term.setup(dm)
    batches = [b for _, b in zip(range(4), dm.train_dataloader(), strict=False)]

    def step(module, optimizer):
        def run():
            for batch in batches:
                loss, _, _ = module.loss(batch, create_graph=True)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return run

    methods = {name: step(m.train(), torch.optim.AdamW(m.parameters(), 1e-4)) for name, m in modules.items()}
    times = alternate(methods, args.rounds)
    plain = median(times["plain"]) / len(batches)
    rows = [[name, f"{1e3 * median(t) / len(batches):.0f}", f"{median(t) / len(batches) / plain:.2f}x"]
            for name, t in times.items()]
    print(machine_line())
    print(table(["student training step (64 conformations)", "ms/step", "vs plain"], rows))


if __name__ == "__main__":
    main()
