"""The cohort as data: manifests (validated, digested), subject-grouped splits, robust photo decoding, the synthetic
demo cohort, dlib's model files, the cohort audit (duplicate photos, one person under two ids) and the decoded uint8
bank.

Owns: `manifest`, `splits`, `checks` (what a cohort must hold before training), `imageio`, `demo`, `weights`,
`audit/` (its own package), `bank`. May import `cushing.config` and `cushing.stats`; never mlflow, `model`, `faces`,
`workflows` or `release`. Only `bank` imports torch; dlib (in `audit`) is imported where it is used.
"""
