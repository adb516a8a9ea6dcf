"""Real-size data: setup time and peak memory, loading share of training, hashing, distillation.

On files written by ``make_ani1x_scale.py`` (ANI-1x release layout at real size or a fraction).
Each measurement runs in a fresh process (peak memory = that process's max RSS):

    python benchmarks/bench_scale.py setup --data /tmp/scale/ani1x_scale.h5
        reader + data-module setup (read, split, SAE fit, packing) for the CC conformations
        (data=ani1ccx: energy_key ccsd(t)_cbs.energy, batch 256): seconds, peak RSS, packed bytes
    python benchmarks/bench_scale.py loading --data FILE [--steps 30]
        share of training spent outside the model step: a real Lightning fit of an energy-only
        ani2x teacher (the cheapest step there is) at batch 256 for --steps batches with the
        SimpleProfiler; ``train_dataloader_next`` (sampling + collating, num_workers=0, i.e. not
        hidden behind workers) over ``run_training_batch`` (forward, backward, optimiser)
    python benchmarks/bench_scale.py hash --data FILE
        provenance hashing: streaming SHA-256 of the file, then cached_sha256 in a new process
        (the persistent cache entry: what every later run pays)
    python benchmarks/bench_scale.py comp6 --data /tmp/scale/comp6_scale
        reading all six COMP6-layout files as one benchmark (what ``evaluate --data FOLDER``
        reads) and packing them for prediction: seconds, peak RSS
    python benchmarks/bench_scale.py distill --data FILE --teachers a.ckpt b.ckpt [--out DIR]
        distillation throughput over every CC conformation (conformations/s, end to end:
        read, pack, predict loop, shards, merged label file), and the label file's size
    python benchmarks/bench_scale.py labels --data FILE [--n-teachers 1] [--rounds 2] [--out DIR]
        the label file of every CC conformation (random teacher predictions, cut into blocks as
        the chunks of 4,096 cut them): size, write time (``write_labels``) and read time
        (``read_labels``, what a student's data module reads) of today's compact layout against
        the dense version-1 code (``tests/labels_v1.py``, a frozen copy), alternating in this
        process; the two read back to the same bytes (checked)

Prints one JSON line per measurement, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
DATA = ["data=ani1ccx", "data.num_workers=0", "logger=csv", "trainer.enable_progress_bar=false"]


def peak_rss_gib() -> float:
    """This process's peak resident memory (GiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def compose(data: str, extra=()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="ekd_lightning.conf", version_base="1.3"):
        return hydra_compose("train", overrides=[*DATA, f"data.path={data}", *extra])


def setup(args) -> dict:
    from ekd_lightning.data import EKDDataModule, read_molecules

    cfg = compose(args.data)
    start = time.perf_counter()
    records, report = read_molecules(args.data, cfg.data.energy_key, None, "ani1x", ["H", "C", "N", "O"])
    read_s = time.perf_counter() - start
    del records
    start = time.perf_counter()
    dm = EKDDataModule(**{k: v for k, v in cfg.data.items()})
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    return {
        "measure": "setup", "file_gib": Path(args.data).stat().st_size / 2**30,
        "conformations": len(dm.packed), "atoms": int(dm.packed.atom_start[-1]),
        "dropped_nonfinite": report.dropped_nonfinite, "read_s": read_s,
        "setup_s": setup_s, "packed_mib": dm.packed.nbytes / 2**20, "peak_rss_gib": peak_rss_gib(),
    }


def loading(args) -> dict:
    import pytorch_lightning as pl

    from ekd_lightning.train.training import build_datamodule, build_module

    cfg = compose(args.data, ["feature_cache_mb=0"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    module = build_module(cfg, dm)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=args.steps,
        limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, profiler="simple", enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    durations = trainer.profiler.recorded_durations
    loading_s = sum(durations["[_TrainingEpochLoop].train_dataloader_next"][1:])  # first: workers
    step_s = sum(durations["run_training_batch"][1:])
    return {"measure": "loading", "batch_size": cfg.data.batch_size, "steps": args.steps - 1,
            "loading_ms_per_batch": 1e3 * loading_s / (args.steps - 1),
            "step_ms_per_batch": 1e3 * step_s / (args.steps - 1),
            "loading_share_of_step": loading_s / step_s, "peak_rss_gib": peak_rss_gib()}


def hash_cost(args) -> dict:
    from ekd_lightning.core.hashing import file_sha256

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "EKD_HASH_CACHE": cache}
        start = time.perf_counter()
        file_sha256(args.data)
        full_s = time.perf_counter() - start
        code = ("import time; from ekd_lightning.core.hashing import cached_sha256; t = time.perf_counter(); "
                f"cached_sha256({args.data!r}); print(time.perf_counter() - t)")
        timings = [  # in a new process each: the first records the hash, the second reads it back
            float(subprocess.run([sys.executable, "-c", code], check=True, env=env,
                                 capture_output=True, text=True).stdout.split()[-1])
            for _ in range(2)
        ]
    return {"measure": "hash", "file_gib": Path(args.data).stat().st_size / 2**30,
            "sha256_s": full_s, "first_run_s": timings[0], "later_run_s": timings[1]}


def comp6(args) -> dict:
    from ekd_lightning.analysis.evaluate import read_benchmark
    from ekd_lightning.data.packed import PackedConformations

    start = time.perf_counter()
    records, _ = read_benchmark(args.data, "energies", "forces", "comp6", ["H", "C", "N", "O"])
    read_s = time.perf_counter() - start
    packed = PackedConformations(records)
    pack_s = time.perf_counter() - start - read_s
    subsets = {}
    for r in records:
        subsets[r.subset] = subsets.get(r.subset, 0) + r.num_conformations
    return {"measure": "comp6", "conformations": subsets, "read_s": read_s,
            "pack_s": pack_s, "packed_mib": packed.nbytes / 2**20, "peak_rss_gib": peak_rss_gib()}


def distill(args) -> dict:
    from ekd_lightning.distill.run import distill_labels, make_job

    out = Path(args.out or tempfile.mkdtemp()) / "labels.h5"
    start = time.perf_counter()
    job = make_job(args.data, "ccsd(t)_cbs.energy", out, list(args.teachers), "ani1x",
                   ["H", "C", "N", "O"], batch_size=256, overwrite=True)
    prepare_s = time.perf_counter() - start
    distill_labels(job, {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
    total_s = time.perf_counter() - start
    return {"measure": "distill", "teachers": len(args.teachers), "conformations": job.n_conformations,
            "prepare_s": prepare_s, "total_s": total_s,
            "conformations_per_s": job.n_conformations / total_s, "peak_rss_gib": peak_rss_gib(),
            "labels_gib": out.stat().st_size / 2**30, "labels_gb": out.stat().st_size / 1e9}


def label_blocks(records, n_teachers: int, chunk: int = 4096, seed: int = 0) -> list:
    """``(group key, conformation indices, arrays)`` blocks of random teacher predictions for
    every kept conformation, cut at multiples of ``chunk`` global conformations as
    ``distill.run`` merges its shards."""
    import numpy as np

    rng, blocks, g = np.random.default_rng(seed), [], 0
    for record in records:
        n_atoms, start = len(record.atomic_numbers), 0
        while start < record.num_conformations:
            n = min(record.num_conformations - start, chunk - (g + start) % chunk)
            forces = rng.standard_normal((n_teachers, n, n_atoms, 3), dtype=np.float32) * 0.02
            energy = rng.standard_normal((n_teachers, n)) - 40.0
            wide = forces.astype(np.float64)
            blocks.append((record.key, np.asarray(record.conf_index[start:start + n]), {
                "forces": wide.mean(0).astype(np.float32), "forces_std": wide.std(0).astype(np.float32),
                "energy": energy.mean(0), "energy_std": energy.std(0),
                "teacher_forces": forces, "teacher_energy": energy}))
            start += n
        g += record.num_conformations
    return blocks


def label_files(args) -> dict:
    """Size, write and read time of the compact label file against the dense version 1."""
    import h5py
    import numpy as np

    from ekd_lightning.data import read_molecules
    from ekd_lightning.data.labels import read_label_metadata, read_labels, write_labels

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from labels_v1 import read_labels_v1, write_labels_v1

    records, _ = read_molecules(args.data, "ccsd(t)_cbs.energy", None, "ani1x", ["H", "C", "N", "O"])
    with h5py.File(args.data, "r") as f:
        sizes = {r.key: int(f[r.key]["coordinates"].shape[0]) for r in records}
    blocks = label_blocks(records, args.n_teachers)
    folder = Path(args.out or tempfile.mkdtemp())
    dense, compact = folder / "labels_v1.h5", folder / "labels_v2.h5"
    old_layout = [(r.key, sizes[r.key], len(r.atomic_numbers)) for r in records]
    new_layout = [(r.key, sizes[r.key], np.asarray(r.conf_index), len(r.atomic_numbers)) for r in records]
    times = {k: [] for k in ("write_v1", "write_v2", "read_v1", "read_v2")}

    def read_dense(path, records):  # version 1's read_labels: the metadata check, then the rows
        read_label_metadata(path)
        return read_labels_v1(path, records)

    def timed(name, fn, *fn_args):
        start = time.perf_counter()
        result = fn(*fn_args)
        times[name].append(time.perf_counter() - start)
        return result

    same = True
    for _ in range(args.rounds):  # alternating: old code, then today's
        timed("write_v1", write_labels_v1, dense, old_layout, args.n_teachers, blocks, {})
        timed("write_v2", write_labels, compact, new_layout, args.n_teachers, blocks, {})
        old = timed("read_v1", read_dense, dense, records)
        new = timed("read_v2", read_labels, compact, records)
        same &= all(a[k].tobytes() == b[k].tobytes() for a, b in zip(old, new, strict=True)
                   for k in ("forces", "force_var"))
        del old, new
    median = {k: float(np.median(v)) for k, v in times.items()}
    result = {"measure": "labels", "conformations": sum(r.num_conformations for r in records),
              "file_conformations": sum(sizes.values()), "n_teachers": args.n_teachers,
              "rounds": args.rounds, "dense_gb": dense.stat().st_size / 1e9,
              "compact_gb": compact.stat().st_size / 1e9, "same_values": same,
              **{f"{k}_s": v for k, v in median.items()},
              "write_new_over_old": median["write_v2"] / median["write_v1"],
              "read_new_over_old": median["read_v2"] / median["read_v1"],
              "times_s": times, "peak_rss_gib": peak_rss_gib()}
    if not args.out:
        dense.unlink()
        compact.unlink()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["setup", "loading", "hash", "comp6", "distill", "labels"])
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--teachers", nargs="*", default=[])
    parser.add_argument("--out", default=None)
    parser.add_argument("--n-teachers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import machine_line

    result = {"setup": setup, "loading": loading, "hash": hash_cost, "comp6": comp6,
              "distill": distill, "labels": label_files}[args.what](args)
    print(json.dumps({**result, "machine": machine_line()}))


if __name__ == "__main__":
    main()
