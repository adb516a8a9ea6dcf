"""Labelling and training on 1 against N GPUs of one node (conformations/s, DDP speed-up).

For a machine with GPUs (none was available when this was written: results go into
``benchmarks/README.md``, section "GPU"). Every measurement is a real ``distill.py`` /
``train.py`` run in a subprocess with ``trainer=ddp trainer.devices=n``:

- **labelling**: ``--teachers`` energy-only ANI teachers (random weights, the data's self
  energies) label the whole dataset; conformations/s = conformations / wall time of the run,
  start-up (imports, reading the file, process group: about 10-20 s) included, so on the
  5,600 bundled conformations it understates the speed-up; pass a large ``--data`` (ANI-1ccx
  layout needs ``data=ani1ccx`` keys: edit ``data_keys``) for the asymptotic figure.
- **training**: an ``ani2x`` student-shaped run (energies + forces, the bundled data's true
  forces: ``stage=oracle``) for ``--epochs`` and for 1 epoch; conformations/s = training
  conformations x (epochs - 1) / (difference of the wall times), which removes the start-up
  and the validation/test passes' fixed part. The per-device batch is ``--batch-size``; the
  global batch grows with the devices (the usual DDP scaling; a fixed global batch is
  ``--batch-size`` / n, see ``--fixed-global-batch``).

    python benchmarks/bench_gpu.py                         # 1 GPU vs all visible GPUs
    python benchmarks/bench_gpu.py --devices 1 2 4 --epochs 4 --teachers 8
    python benchmarks/bench_gpu.py --accelerator cpu --devices 1 2 --epochs 2 --teachers 2 \
        --train-overrides data.train_fraction=0.05                            # check it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def save_teachers(folder: Path, n: int, data: str, energy_key: str) -> list[str]:
    """``n`` ani2x-sized (arch ``ani``) checkpoints with random weights (labelling costs the same as trained ones)."""
    from ekd_lightning.data import EKDDataModule
    from ekd_lightning.task.module import PotentialModule

    dm = EKDDataModule(data, energy_key)
    dm.setup()
    paths = []
    for seed in range(n):
        torch.manual_seed(seed)
        module = PotentialModule({"_target_": "ekd_lightning.models.ani.ANIModel"}, elements=dm.elements,
                                 self_energies=dm.self_energies.tolist(), energy_scale=dm.energy_scale)
        path = folder / f"teacher{seed}.ckpt"
        torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
        paths.append(str(path))
    return paths


def timed_run(script: str, overrides: list[str], cwd: Path) -> float:
    """Wall seconds of ``python <script> <overrides>`` (raises with its output if it fails)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=cwd,
                            capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if result.returncode:
        raise RuntimeError(f"{script} {' '.join(overrides)}\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return time.perf_counter() - start


def trainer(accelerator: str, devices: int) -> list[str]:
    return ["trainer=ddp", f"trainer.accelerator={accelerator}", f"trainer.devices={devices}",
            "trainer.enable_progress_bar=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+",
                        default=sorted({1, max(1, torch.cuda.device_count())}))
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--data", default=None, help="HDF5 file (default: the bundled xtb_train.h5)")
    parser.add_argument("--energy-key", default="gfn2_xtb.energy", help="of --data")
    parser.add_argument("--teachers", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--fixed-global-batch", action="store_true")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--train-overrides", nargs="*", default=[],
                        help="more Hydra overrides for train.py, e.g. data.train_fraction=0.1")
    args = parser.parse_args()

    from ekd_lightning.bundled import DATA_DIR

    data = args.data or str(DATA_DIR / "xtb_train.h5")
    data_keys = [f"data.path={data}", f"data.energy_key={args.energy_key}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teachers = save_teachers(work, args.teachers, data, args.energy_key)
        from ekd_lightning.data import EKDDataModule

        dm = EKDDataModule(data, args.energy_key)
        dm.setup()
        n_all = sum(len(g) for g in dm.graphs.values())
        fraction = next((float(o.split("=", 1)[1]) for o in args.train_overrides
                         if o.startswith("data.train_fraction=")), 1.0)
        n_train = round(len(dm.graphs["train"]) * fraction)
        for n in args.devices:
            batch = args.batch_size // n if args.fixed_global_batch else args.batch_size
            label = ["teachers=[" + ",".join(teachers) + "]", f"batch_size={batch}",
                     f"hydra.run.dir={work / f'hydra-label-{n}'}", *data_keys, *trainer(args.accelerator, n)]
            seconds = timed_run("distill.py", [*label, f"out={work / f'labels-{n}.h5'}"], work)
            rows.append({"task": "labelling", "devices": n, "conformations": n_all, "wall_s": seconds,
                         "conformations_per_s": n_all / seconds, "teachers": args.teachers})
            train = ["stage=oracle", f"data.batch_size={batch}", "resume=false", "logger=csv", *data_keys,
                     *trainer(args.accelerator, n), *args.train_overrides]
            walls = {}
            for epochs in (1, args.epochs):
                walls[epochs] = timed_run("train.py", [
                    *train, f"trainer.max_epochs={epochs}",
                    f"hydra.run.dir={work / f'train-{n}-{epochs}'}"], work)
            rate = n_train * (args.epochs - 1) / (walls[args.epochs] - walls[1])
            rows.append({"task": "training", "devices": n, "conformations": n_train,
                         "wall_s": walls[args.epochs], "conformations_per_s": rate,
                         "batch_per_device": batch})
    base = {r["task"]: r["conformations_per_s"] for r in rows if r["devices"] == args.devices[0]}
    print(f"{'task':<10} {'devices':>7} {'conf/s':>10} {'speed-up':>8} {'wall s':>8}")
    for r in rows:
        r["speed_up"] = r["conformations_per_s"] / base[r["task"]]
        print(f"{r['task']:<10} {r['devices']:>7} {r['conformations_per_s']:>10.1f} "
              f"{r['speed_up']:>7.2f}x {r['wall_s']:>8.1f}")
    machine = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
               "torch": torch.__version__, "accelerator": args.accelerator}
    print(json.dumps(machine))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
