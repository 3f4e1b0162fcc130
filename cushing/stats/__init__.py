"""Statistics on predictions tables. Owns: `metrics` (the one metric implementation), `subgroups`, `intervals`
(Wilson, the subject bootstrap), `thresholds`, `calibration`, `decision` curves, sample `size`s, `paired` tests, the
`report` and `plots`. Dependencies run one way: metrics, subgroups <- intervals <- thresholds, decision, size,
calibration, paired <- report, plots. May import numpy, pandas, scipy and matplotlib; never torch, mlflow or another
cushing subpackage.
"""
