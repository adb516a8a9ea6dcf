#!/usr/bin/env bash
# EKD ablation on the bundled data: each variant (conf/ablation/*.yaml) is a full pipeline
# (python train.py experiment=ekd +ablation=NAME); runs they share (teachers, baselines, the
# oracle) are trained once, in runs/store. Table: runs/ablation/ablation.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
variants="${1:-converged,ani2x_only,more_teachers,wide_teachers,wide_more_teachers,diverse_teachers,equivariant_teachers,snapshot_teachers,subsets,mixed,mixed_plus,uncertainty,force_weight,warmup,extra_geometries,hessian}"
python train.py -m experiment=ekd "+ablation=${variants}" hydra.sweep.dir=runs/ablation \
    'hydra.sweep.subdir=${run_name}'
python -m ekd_lightning.workflow.pipeline ablation runs/ablation --out runs/ablation/ablation.md
