"""Label a dataset with a teacher ensemble (ensemble knowledge distillation).

python distill.py teachers=[run1/last.ckpt,run2/last.ckpt] data=bundled out=labels.h5
python distill.py teachers.dir=runs/teachers data=ani1ccx data.path=ani1x-release.h5
python distill.py teachers=torchani_ani1ccx out=labels.h5            # needs torchani's weights
python distill.py teachers=[...] trainer=ddp trainer.devices=4        # several GPUs / CPU processes

Every conformation gets each teacher's energy and forces (F = -dE/dx), the ensemble mean force
(the label) and the spreads, in an HDF5 label file (format: ekd_lightning.labels). A killed run
restarted with the same arguments resumes from its shards (<out>.shards/).
"""

import sys

import hydra
from omegaconf import DictConfig

from ekd_lightning.distill import run_from_config, teachers_override_argv
from ekd_lightning.training import register_resolvers

register_resolvers()
sys.argv = teachers_override_argv(sys.argv)


@hydra.main(version_base="1.3", config_path="pkg://ekd_lightning.conf", config_name="distill")
def main(cfg: DictConfig) -> None:
    print(f"labels: {run_from_config(cfg)}")


if __name__ == "__main__":
    main()
