"""``python -m ekd_lightning.workflow.pipeline ablation FOLDER``."""

from .ablation import main

raise SystemExit(main())
