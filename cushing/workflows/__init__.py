"""What users run: a tracked training (and CV folds, seeds, resume), study files, sweeps and tuning on Optuna's
storage (local workers or a Slurm job array), the sweep planner, benchmarks, the dashboard, the cohort audit as a
tracked step, and jobs on existing models (Grad-CAM, external validation, paired comparison).

Owns: `experiment`, `finishing`, `studies`, `sweeps/` (storage, parent, grid, worker, launcher, tables, scope, tune),
`cluster/`, `plan`, `bench`, `bench_run`, `bench_serve`, `dashboard`, `cohort_audit`, `jobs`. Composes every other
subpackage; MLflow only through `cushing.tracking` and `cushing.release` (never `import mlflow` here). optuna and
submitit are imported where they are used.
"""
