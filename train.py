"""Train an MLIP: python train.py model=ani2x stage=teacher|baseline|student|oracle [...]

Hydra composes conf/train.yaml; sweep with -m, e.g.
python train.py -m stage=student distill.labels=labels.h5 loss.force_weight=0.01,0.1,1

The whole EKD pipeline (teachers, distillation, student, baseline, evaluation, MD, report):
python train.py experiment=ekd
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ekd_lightning.training import register_resolvers, run_training

register_resolvers()


@hydra.main(version_base="1.3", config_path="pkg://ekd_lightning.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    out_dir = HydraConfig.get().runtime.output_dir
    if cfg.get("pipeline") is not None:
        from ekd_lightning.pipeline import run_pipeline

        report = run_pipeline(cfg, out_dir)  # returns the force-error gap closed on held-out data
        return report.get("heldout", {}).get("force_gap_closed", float("nan"))
    metrics = run_training(cfg, out_dir)
    return metrics.get("val/loss", float("nan"))


if __name__ == "__main__":
    main()
