"""The whole EKD pipeline in one command: ``python train.py experiment=ekd``.

Steps (each resumable: a finished step is skipped when the command is run again):

1. **teachers**: energy-only models, one per entry of ``pipeline.teachers.models`` (any mix of
   architectures), each with its own seed and, optionally, its own random subset of the
   training split (``pipeline.teachers.train_fraction``); folder ``teachers/teacherN``.
2. **distill**: the teacher ensemble labels every conformation of the dataset with the mean
   force and the spread (:mod:`ekd_lightning.distill`); ``labels.h5``.
3. **student**: reference energies + distilled forces; **baseline**: the same recipe on energies
   only; **oracle** (when the data has true forces): the same recipe on the true forces. Each
   with the seeds ``pipeline.seeds``; folders ``student/seedS`` etc.
4. **evaluate**: every model (teachers, the teacher ensemble, students, baselines, oracles) on
   the held-out conformations of the training molecules (``report/heldout``) and on the
   out-of-sample test file (``report/test``, COMP6 layout), plus the quality of the distilled
   labels against the true forces where the dataset has them.
5. **md**: Langevin MD stability and NVE drift of baseline vs student (vs oracle).
6. **report**: ``report/summary.md`` (tables, mean ± spread over seeds, the student against
   baseline, best single teacher, ensemble and oracle, the fraction of the force-error gap
   closed, (baseline − student) / (baseline − oracle), guarded by :func:`gap_verdict`; stop
   epochs, training and inference cost; learning curves and parity figures),
   ``report/summary.json``, printed at the end and logged to W&B when ``logger=wandb``.

Every training run gets the composed config's ``callbacks`` (``experiment=ekd``: the one
early-stopping rule) and the epoch cap ``pipeline.max_epochs``, teachers included.

Training runs are typed records (:class:`RunSpec`: role, stage, model, seed, epoch cap and the
variant's overrides; their names in the report derive from them), each composed by Hydra's
compose API from the same config tree as ``train.py`` with recorded overrides: the pipeline
command's own (less ``pipeline.*``, deleted from the run's config), then
``stage=... model=... seed=... trainer.max_epochs=... run_name=...`` and the variant's (a
teacher's data subset, the student's labels, ``pipeline.force_overrides`` /
``student_overrides`` written as ``++key=value``). Everything else (data, trainer, optim, logger
and their command-line overrides) is shared by all runs. Each run's ``run_info.json`` records
``command``, the ``ekd-train ... hydra.run.dir=<run folder>`` line that composes it again; the
worker processes and submitit jobs get the resolved config.

The package: :mod:`.runs` (records), :mod:`.composition` (each run's overrides), :mod:`.runners`
(training the jobs), :mod:`.steps` (labels, evaluation, MD), :mod:`.report`, :mod:`.driver`
(:func:`run_pipeline`) and :mod:`.ablation` (the ablation table).
"""

from .ablation import ABLATION_COLUMNS, ablation_row, ablation_table, main  # noqa: F401
from .composition import (  # noqa: F401
    SET_PER_RUN,
    checked_command,
    default_teacher_jobs,
    make_jobs,
    run_overrides,
    teacher_jobs,
    teacher_specs,
    variant_jobs,
    variant_specs,
)
from .driver import run_pipeline  # noqa: F401
from .report import (  # noqa: F401
    FIGURES,
    FORCE_MAE,
    SEEDED,
    best_teacher,
    convergence_note,
    gap_closed,
    gap_verdict,
    inference_cost,
    log_to_wandb,
    markdown_table,
    seed_summary,
    training_record,
    write_report,
)
from .runners import Runner, SubmititRunner, finished_run, make_runner, run_job, submit_unfinished  # noqa: F401
from .runs import Job, Run, RunSpec, member_checkpoints  # noqa: F401
from .steps import (  # noqa: F401
    default_teacher_labels,
    distill,
    evaluate,
    extra_geometries,
    first_seed_run,
    hessian_labels,
    md_stability,
    named_models,
    teacher_keyed_path,
)
