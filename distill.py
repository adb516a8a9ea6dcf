"""Label a dataset with a teacher ensemble (ensemble knowledge distillation).

The same as the console command ``ekd-distill`` (:func:`ekd_lightning.cli.distill`):
python distill.py teachers=[run1/last.ckpt,run2/last.ckpt] data=bundled out=labels.h5
python distill.py teachers.dir=runs/teachers data=ani1ccx data.path=ani1x-release.h5
python distill.py teachers=torchani_ani1ccx out=labels.h5            # needs torchani's weights
python distill.py teachers=[...] trainer=ddp trainer.devices=4        # several GPUs / CPU processes

Every conformation gets each teacher's energy and forces (F = -dE/dx), the ensemble mean force
(the label) and the spreads, in an HDF5 label file (format: ekd_lightning.data.labels). A killed run
restarted with the same arguments resumes from its shards (<out>.shards/).
"""

from ekd_lightning.cli import distill

if __name__ == "__main__":
    distill()
