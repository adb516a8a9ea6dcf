"""Train an MLIP: python train.py model=ani2x stage=teacher|baseline|student|oracle [...]

The same as the console command ``ekd-train`` (:func:`ekd_lightning.cli.train`). Hydra
composes the packaged ``conf/train.yaml``; sweep with -m, e.g.
python train.py -m stage=student distill.labels=labels.h5 loss.force_weight=0.01,0.1,1

The whole EKD pipeline (teachers, distillation, student, baseline, evaluation, MD, report):
python train.py experiment=ekd
"""

from ekd_lightning.cli import train

if __name__ == "__main__":
    train()
