"""Statistics on predictions tables: metrics, intervals, thresholds, calibration, decision curves, sample sizes,
paired tests, reports, plots.

Owns: the one metric implementation (`metrics`: weighted confusion counts, rates, rank AUC), subgroups
(`subgroups`), intervals and the subject bootstrap (`intervals`), operating thresholds and their guarantees
(`thresholds`), calibration (`calibration`), decision curves (`decision`), sample sizes (`size`), paired tests
(`paired`), the report of a predictions table (`report`) and figures (`plots`). Dependencies run one way: metrics,
subgroups <- intervals <- thresholds, decision, size, calibration, paired <- report, plots. May import numpy, pandas,
scipy and matplotlib; never torch, mlflow or another cushing subpackage.
"""
