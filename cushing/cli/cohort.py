"""The cohort before training: `cushing faces` (the face stage), `cushing audit` (the same photo, or the same
person, under two subject ids) and `cushing size` (what a cohort of this size can show)."""
from __future__ import annotations

import argparse
import math
import shlex
import sys

from cushing.cli.options import Command, _yes

COMMANDS: dict[str, Command] = {}


def _faces_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="photos: a manifest CSV (image, label, sex, ...)")
    p.add_argument("--out", required=True, help="folder for crops/, manifest.csv, faces_report.csv")
    p.add_argument("--sam-checkpoint", default=None, help="SAM weights (vit_h, vit_l or vit_b .pth)")
    p.add_argument("--sam-model-type", default=None, help="vit_h | vit_l | vit_b (default: read from the weights)")
    p.add_argument("--mask", default="auto", help="auto | sam | landmark_hull | none")
    p.add_argument("--detector", default="hog", help="hog | cnn (dlib's mmod detector)")
    p.add_argument("--max-upsample", type=int, default=2)
    p.add_argument("--margin", type=float, default=0.15)
    p.add_argument("--cache-dir", default=None, help="content-addressed cache (default ~/.cache/cushing/faces)")
    p.add_argument("--workers", type=int, default=0, help="dlib processes (default: one per core)")
    p.add_argument("--device", default="auto", help="where SAM runs")
    p.add_argument("--skip-bad-photos", type=_yes, default=False, metavar="BOOL",
                   help="true: leave out photos that cannot be found, read or cropped (counted, logged) instead of "
                        "stopping on them")
    p.add_argument("--allow-phi-artifacts", type=_yes, default=False, metavar="BOOL",
                   help="true: log montages of crops and failures")
    p.add_argument("--experiment", default="cushing")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def _faces(ns: argparse.Namespace) -> int:
    from cushing.faces.settings import FaceSettings
    from cushing.faces.run import run_faces

    settings = FaceSettings(detector=ns.detector, max_upsample=ns.max_upsample, margin=ns.margin, mask=ns.mask,
                            sam_checkpoint=ns.sam_checkpoint or None, sam_model_type=ns.sam_model_type or None,
                            device=ns.device)
    res = run_faces(manifest=ns.manifest, out=ns.out, settings=settings, cache_dir=ns.cache_dir or None,
                    workers=ns.workers, experiment=ns.experiment, allow_phi=ns.allow_phi_artifacts,
                    track=not ns.no_track, skip_bad_photos=ns.skip_bad_photos)
    o = res.outcome
    rep = o.report
    print(f"extracted {o.extracted} of {len(rep)} photos ({o.cached} from cache, {o.processed} processed, "
          f"{o.seconds:.1f} s; mask: {o.settings.mask_method})")
    for reason, n in rep.loc[rep["status"] != "ok", "reason"].value_counts().items():
        print(f"  rejected {n:4d} {reason}")
    print(f"face-crop manifest: {o.manifest}\nreport: {o.manifest.parent / 'faces_report.csv'}")
    if res.run_id:
        print(f"face-stage run {res.run_id}: quality audit, skipped photos per class and sex (no faces, no names)")
    if n := len(o.skipped):
        print(f"skipped {n} photo{'s' * (n != 1)} that gave no face crop (--skip-bad-photos true): "
              + ", ".join(f"{k} {v}" for k, v in o.skipped["reason"].value_counts().items()))
    if o.extracted == 0:
        print("cushing faces: no face could be extracted", file=sys.stderr)
        return 3
    return 0


COMMANDS["faces"] = ("extract aligned, masked face crops (dlib + SAM or landmark hull), cached", _faces_args, _faces)


def _audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="the cohort (manifest CSV, or demo)")
    p.add_argument("--out", required=True, help="folder for audit.csv and audit_summary.csv (with --evaluate: the "
                                                "threshold tables and same_person_curve.csv)")
    p.add_argument("--threshold", default="auto",
                   help="same-person distance: auto (default) = the loosest distance at which the curve expects at "
                        "most 0.2 false pairs per photo in this cohort (by its sex mix), keeping only mutual "
                        "nearest neighbours in one split as a precaution and lowered until no such group holds "
                        "over 5%% of the photos; or a number. Pairs closer than the strict distance (about 0.05 "
                        "false pairs expected in the whole cohort) are merged as one person")
    p.add_argument("--decisions", default=None,
                   help="a reviewed CSV (audit.csv with its verdict column filled in: same or different): a "
                        "`different` pair is released (never kept together), a `same` pair is merged at any "
                        "distance")
    p.add_argument("--curve", default=None, help="a same-person curve CSV from --evaluate on your own labelled "
                                                 "photos (default: the one shipped, measured on CelebA)")
    p.add_argument("--review-page", default=None, metavar="OUT.html",
                   help="write a local HTML page with the two photos of each merged, precaution and review pair "
                        "side by side (embedded; PHI: logged to MLflow only with --allow-phi-artifacts true)")
    p.add_argument("--allow-phi-artifacts", type=_yes, default=False, metavar="BOOL",
                   help="true: also log the review page and the decisions file to MLflow")
    p.add_argument("--no-faces", action="store_true", help="duplicates only: skip the same-person check (dlib)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    p.add_argument("--cache-dir", default=None, help="hash/descriptor cache (default ~/.cache/cushing/audit)")
    p.add_argument("--experiment", default="cushing")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--evaluate", action="store_true",
                   help="measure the thresholds on a manifest whose subject ids are true identities, and write "
                        "OUT/same_person_curve.csv (the format --curve reads)")
    p.add_argument("--photos", type=int, default=2000,
                   help="--evaluate: photos sampled (whole identities first); 0 = every photo")
    p.add_argument("--seed", type=int, default=0, help="--evaluate: the sample's seed")


def _evaluate(ns: argparse.Namespace) -> int:
    from cushing.workflows.cohort_audit import run_evaluation

    table, dup = run_evaluation(manifest=ns.manifest, out=ns.out, photos=ns.photos, seed=ns.seed, workers=ns.workers,
                                cache_dir=ns.cache_dir, command=shlex.join(["cushing", "audit", *sys.argv[2:]]))
    cols = ["threshold", "group", "pos_pairs", "precision", "precision_lo", "precision_hi", "recall",
            "recall_lo", "recall_hi", "false_pairs_per_343"]
    print(table[[c for c in cols if c in table.columns]].round(3).to_string(index=False))
    print(f"duplicates: {dup['false_pairs']} false pairs among {dup['stranger_pairs']:,} pairs of different "
          f"people (closest {dup['min_stranger_bits']} bits); copies found: {dup['copies_found']:.3f}")
    print(f"same-person curve: {dup['curve']} (use it with --curve, or -P audit_curve=...)")
    _warn_thin(dup["curve"])
    return 0


def _warn_thin(path: str) -> None:
    """~125k stranger pairs (~500 photos) of a sex resolve the rates a 1,000-photo cohort's threshold reads."""
    from cushing.data.audit.threshold import read_curve

    t = read_curve(path).table
    for g, who in (("F", "women"), ("M", "men")):
        if (n := int(t[f"neg_pairs_{g}"].iat[0])) < 125_000:
            print(f"warning: only {n:,} pairs of different {who} in this curve (fewer than 125,000, ~500 photos): "
                  f"its {g}-{g} rates are coarse; add labelled photos before auditing with it", file=sys.stderr)


def _audit(ns: argparse.Namespace) -> int:
    from cushing.data.audit.decisions import DecisionsError
    from cushing.workflows.cohort_audit import run_audit

    if ns.evaluate:
        return _evaluate(ns)
    try:
        res = run_audit(manifest=ns.manifest, out=ns.out, faces=not ns.no_faces, threshold=ns.threshold,
                        decisions=ns.decisions or None, curve=ns.curve or None, review=ns.review_page or None,
                        allow_phi=ns.allow_phi_artifacts, workers=ns.workers, cache_dir=ns.cache_dir,
                        experiment=ns.experiment, track=not ns.no_track)
    except (DecisionsError, ValueError, FileNotFoundError) as e:
        print(f"cushing audit: {e}", file=sys.stderr)
        return 2
    _print_audit(res)
    return 0


def _print_audit(res) -> None:
    from cushing.data.audit.settings import OUTCOMES

    a = res.audit
    n = len(a.photos)
    print(f"{n} photos in {a.seconds:.2f} s ({n / max(a.seconds, 1e-9):.1f} photos/s; {a.computed} computed, "
          f"{a.cached} from cache){'' if res.faces else '; same-person check skipped (synthetic or --no-faces)'}")
    s = a.summary()
    if c := a.choice:
        how = (f"auto ({'lowered by the group guard' if c.guard_bound else 'from the curve'})" if c.auto
               else "fixed")
        e = f"; expected false pairs {c.expected_false_pairs:.1f}" if math.isfinite(c.expected_false_pairs) else ""
        print(f"  same-person threshold {c.threshold:.3f}, {how}{e}; strict distance {c.strict:.3f} (expected "
              f"false merges {c.expected_false_merges:.2f}); largest group kept in one split "
              f"{s['audit/largest_group']:.0f} photos (limit {c.group_limit})")
    different = a.pairs[~a.pairs["same_subject"]]
    counts = different.groupby(["kind", "outcome"]).size().items()
    for (kind, outcome), count in sorted(counts, key=lambda kv: (kv[0][0], list(OUTCOMES).index(kv[0][1]))):
        print(f"  {count:4d} {kind} pairs of different subject ids, {OUTCOMES[outcome]}")
    print(f"  subject ids: {s['audit/merged_subjects']:.0f} merged as one photo or one person, "
          f"{s['audit/precaution_subjects']:.0f} kept in one split as a precaution (for review)")
    if a.decisions is not None:
        print(f"  decisions {a.decisions.path}: {a.decisions.count('same')} same, "
              f"{a.decisions.count('different')} different, {a.decisions.unmatched} not in this manifest")
    print(f"  cohort size: {res.size}")
    print(f"audit: {res.out}" + (f" (logged to run {res.run_id})" if res.run_id else ""))
    if res.review_page:
        print(f"review page (PHI, local): {res.review_page}")


COMMANDS["audit"] = ("find the same photo, or the same person, under two subject ids (before splitting)",
                     _audit_args, _audit)


def _size_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="the cohort (manifest CSV, or demo)")
    p.add_argument("--sensitivity", type=float, default=0.85, help="expected recall (default 0.85)")
    p.add_argument("--specificity", type=float, default=0.9, help="expected specificity (default 0.9)")
    p.add_argument("--auc", type=float, default=0.9, help="expected AUC (default 0.9)")
    p.add_argument("--width", type=float, default=0.2, help="target 95%% interval width, upper - lower (default 0.2)")
    p.add_argument("--split-ratios", default="1:1:1", help="train:val:test as the run would use (default 1:1:1)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--subgroups", default="sex", help="manifest columns to plan per value of (default sex)")


def _size(ns: argparse.Namespace) -> int:
    from cushing.workflows.cohort_audit import cohort_size

    try:
        t = cohort_size(manifest=ns.manifest, sensitivity=ns.sensitivity, specificity=ns.specificity, auc=ns.auc,
                        width=ns.width, split_ratios=ns.split_ratios, split_seed=ns.split_seed, subgroups=ns.subgroups)
    except ValueError as e:
        print(f"cushing size: {e}", file=sys.stderr)
        return 2
    print(f"test split, in subjects; expected 95% interval widths at recall {ns.sensitivity:g}, specificity "
          f"{ns.specificity:g}, AUC {ns.auc:g}; needed for a width of {ns.width:g} (Buderer 1996; Hanley & "
          "McNeil 1982)")
    print(t.round(3).to_string(index=False))
    return 0


COMMANDS["size"] = ("what a cohort can show: interval widths per sex and subgroup, and the patients a target "
                    "width needs", _size_args, _size)
