#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole EKD pipeline on the bundled GFN2-xTB data:
# teachers -> distillation -> student / energy-only baseline / true-force oracle -> evaluation
# on held-out conformations and the COMP6-like test set -> MD stability -> report.
# Every model under the one stopping rule with a cap of 40 epochs and the default four ANI
# teachers: about 11 minutes on 2 CPU cores. `bash scripts/ekd.sh ensemble@pipeline.teachers=ani_visnet`
# adds two small equivariant ViSNet teachers: far better students, about 18 minutes (README,
# "Budget-matched").
# The report is runs/ekd/report/summary.md; extra arguments are Hydra overrides, e.g.
#   bash scripts/ekd.sh pipeline.seeds=[0] pipeline.teachers.max_epochs=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true
python train.py experiment=ekd "$@"
