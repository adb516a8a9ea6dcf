"""Train an MLIP: python train.py model=ani2x stage=teacher|baseline|student|oracle [...]

Hydra composes conf/train.yaml; sweep with -m, e.g.
python train.py -m stage=student distill.labels=labels.h5 loss.force_weight=0.01,0.1,1
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ekd_lightning.training import register_resolvers, run_training

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    metrics = run_training(cfg, HydraConfig.get().runtime.output_dir)
    return metrics.get("val/loss", float("nan"))


if __name__ == "__main__":
    main()
