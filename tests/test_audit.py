"""The cohort audit on real CelebA faces (read from ../shared at test time; derived copies only under tmp_path):
duplicate photos across formats and sizes, the same person under two ids, the merge into split groups, the cache,
and PHI-free output."""
from __future__ import annotations

import io
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cushing.data.audit import (AuditSettings, audit_manifest, descriptor_pairs, hamming_pairs, merged_groups,
                           perceptual_hash)
from cushing.data.imageio import open_rgb
from cushing.data.manifest import load_manifest


SPLITS = ("train", "val", "test")


def _one_sex(df: pd.DataFrame) -> pd.DataFrame:
    """CelebA's Male attribute is noisy within identities; the manifest contract wants one sex per subject."""
    df = df.copy()
    df["sex"] = df["subject_id"].map(df.groupby("subject_id")["sex"].agg(lambda s: s.mode()[0]))
    return df


def _write(df: pd.DataFrame, path) -> object:
    df[["image", "label", "sex", "subject_id", "split"]].to_csv(path, index=False)
    return load_manifest(path)


def _copies(src: str, out) -> dict[str, str]:
    """A photo re-saved as PNG, resized 0.7x, recompressed at JPEG quality 60, all three chained, and mirrored."""
    im = Image.open(src).convert("RGB")
    small = (round(im.width * 0.7), round(im.height * 0.7))
    made = {"png": out / "a.png", "resized": out / "b.jpg", "q60": out / "c.jpg", "chain": out / "d.jpg",
            "mirrored": out / "e.jpg"}
    im.save(made["png"])
    im.resize(small, Image.Resampling.LANCZOS).save(made["resized"], quality=95)
    im.save(made["q60"], quality=60)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    Image.open(buf).resize(small, Image.Resampling.BILINEAR).save(made["chain"], quality=60)
    im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(made["mirrored"], quality=90)
    return {k: str(v) for k, v in made.items()}


# ------------------------------------------------------------------------------------------- pure functions

def test_hamming_pairs_match_a_brute_force_count():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2 ** 63, size=(300, 4), dtype=np.uint64)
    h[7] = h[3]
    h[7, 2] ^= np.uint64(0b1011)  # 3 bits apart
    h[200] = h[100]
    i, j, d = hamming_pairs(h, 115, block_rows=64)  # random 256-bit words: ~5% of pairs within 115 bits
    brute = {(a, b): sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(h[a], h[b]))
             for a in range(300) for b in range(a + 1, 300)}
    want = {k: v for k, v in brute.items() if v <= 115}
    assert len(want) > 100
    assert dict(zip(zip(i.tolist(), j.tolist()), d.tolist())) == want
    assert want[(3, 7)] == 3 and want[(100, 200)] == 0


def test_descriptor_pairs_skip_same_group_and_missing_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 128)).astype(np.float32)
    x[10] = x[20] + 0.01
    x[30] = x[31] + 0.01
    x[40] = np.nan
    groups = np.arange(50).astype(str)
    groups[31] = groups[30]  # same subject: never reported
    i, j, d = descriptor_pairs(x, 0.5, groups=groups, block_rows=7)
    assert list(zip(i.tolist(), j.tolist())) == [(10, 20)]
    assert d[0] == pytest.approx(np.linalg.norm(x[10] - x[20]), abs=1e-6)


def test_merged_groups_is_transitive_and_named_by_the_smallest_id():
    subjects = pd.Series(["s3", "s1", "s2", "s3", "s4", "s5"])
    pairs = pd.DataFrame({"kind": ["same_person", "duplicate_photo", "same_person"],
                          "line_a": [2, 3, 6], "line_b": [4, 5, 7], "distance": [0.4, 3, 0.45]})
    # rows 0 (s3) - 2 (s2); rows 1 (s1) - 3 (s3); rows 4 (s4) - 5 (s5)
    g = merged_groups(pairs, subjects)
    assert g.tolist() == ["s1", "s1", "s1", "s1", "s4", "s4"]
    only_dups = merged_groups(pairs, subjects, kinds=["duplicate_photo"])
    assert only_dups.tolist() == ["s1", "s1", "s2", "s1", "s4", "s5"]
    told = pairs.assign(outcome=["precaution", "merged", "review"])  # a review pair keeps nobody together
    assert merged_groups(told, subjects).tolist() == ["s1", "s1", "s1", "s1", "s4", "s5"]
    assert merged_groups(told, subjects, outcomes=["merged"]).tolist() == ["s1", "s1", "s2", "s1", "s4", "s5"]


def test_perceptual_hash_survives_reencoding_but_not_a_different_face(celeba_manifest, tmp_path):
    s = AuditSettings()
    rows = celeba_manifest.drop_duplicates("subject_id").head(2)
    base = perceptual_hash(open_rgb(rows["image"].iloc[0]))
    other = perceptual_hash(open_rgb(rows["image"].iloc[1]))
    assert base.shape == (4,) and base.dtype == np.uint64
    for name, path in _copies(rows["image"].iloc[0], tmp_path).items():
        c = perceptual_hash(open_rgb(path))
        bits = int(np.bitwise_count(c ^ base).sum())
        if name == "mirrored":  # found through the mirror hash instead
            bits = int(np.bitwise_count(c ^ perceptual_hash(open_rgb(rows["image"].iloc[0]), mirror=True)).sum())
        assert bits <= s.duplicate_max_bits, f"{name}: {bits} bits"
    assert int(np.bitwise_count(other ^ base).sum()) > s.duplicate_max_bits
    # stored sideways with an EXIF orientation tag: the hash sees the photo upright, as a viewer would
    sideways = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.open(rows["image"].iloc[0]).transpose(Image.Transpose.ROTATE_90).save(sideways, quality=95, exif=exif)
    raw = np.asarray(Image.open(sideways).convert("RGB"))
    assert raw.shape[:2] == (89, 109), "stored sideways"
    assert int(np.bitwise_count(perceptual_hash(open_rgb(sideways)) ^ base).sum()) <= s.duplicate_max_bits
    assert int(np.bitwise_count(perceptual_hash(raw) ^ base).sum()) > s.duplicate_max_bits


# ----------------------------------------------------------------------------------- duplicates, real photos

@pytest.fixture(scope="module")
def dup_audit(celeba_manifest, tmp_path_factory):
    """300 photos of 300 different identities + 5 derived copies of the first one, under new ids in other splits."""
    d = tmp_path_factory.mktemp("dups")
    base = _one_sex(celeba_manifest).drop_duplicates("subject_id").sample(300, random_state=0)
    base = base.reset_index(drop=True)
    base["split"] = [SPLITS[k % 3] for k in range(len(base))]
    made = _copies(base["image"].iloc[0], d)
    copies = pd.DataFrame([{**base.iloc[0].to_dict(), "image": p, "subject_id": f"copy_{name}", "split": "test"}
                           for name, p in made.items()])
    m = _write(pd.concat([base, copies], ignore_index=True), d / "manifest.csv")
    res = audit_manifest(m, settings=AuditSettings(faces=False), cache_dir=d / "cache", workers=2, progress=False)
    return res, m, list(made)


def test_duplicates_found_across_formats_sizes_and_mirror(dup_audit):
    res, m, names = dup_audit
    dup = res.pairs[res.pairs["kind"] == "duplicate_photo"]
    n = len(m.table)
    copy_lines = list(range(n - len(names) + 2, n + 2))
    group = [2] + copy_lines  # the original (line 2) and its copies: every pair among them, nothing else
    want = {(a, b) for a in group for b in group if a < b}
    assert set(zip(dup["line_a"], dup["line_b"])) == want, "copies missed or strangers paired"
    assert (dup["distance"] <= AuditSettings().duplicate_max_bits).all()
    mirrored_line = copy_lines[names.index("mirrored")]
    via_mirror = dup[(dup["line_a"] == 2) & (dup["line_b"] == mirrored_line)]
    assert via_mirror["detail"].tolist() == ["mirrored"]
    assert dup.loc[(dup["line_a"] == 2) & (dup["line_b"] == copy_lines[0]), "distance"].item() == 0, "PNG: lossless"
    assert dup.set_index(["line_a", "line_b"]).loc[(2, copy_lines[1]), "straddles_splits"], "train vs test"
    assert (res.photos["status"] == "ok").all() and res.computed == n


# ---------------------------------------------------------------------------------- same person, two ids

@pytest.fixture(scope="module")
def twin_ids(celeba_manifest, tmp_path_factory):
    """5 identities with 3 photos each, 1 of each re-entered under a made-up id (in another split), + 8 strangers.
    (A merged group of 3 photos is what the guard allows at 23 photos: max(floor(5% x 23), 3).)"""
    d = tmp_path_factory.mktemp("twins")
    df = _one_sex(celeba_manifest)
    counts = df["subject_id"].value_counts()
    ids = sorted(counts[counts >= 5].index)[:5]
    people = df[df["subject_id"].isin(ids)].groupby("subject_id").head(3).copy()
    people["label"] = people.groupby("subject_id")["label"].transform("first")  # CelebA's Chubby is per photo
    people["rank"] = people.groupby("subject_id").cumcount()
    people["split"] = "train"
    moved = people["rank"] >= 2
    people.loc[moved, "subject_id"] = people.loc[moved, "subject_id"] + "_b"
    people.loc[moved, "split"] = "val"
    strangers = df[~df["subject_id"].isin(ids)].drop_duplicates("subject_id").sample(8, random_state=1)
    strangers["split"] = "test"
    table = pd.concat([people.drop(columns="rank"), strangers], ignore_index=True)
    m = _write(table, d / "manifest.csv")
    t0 = time.perf_counter()
    res = audit_manifest(m, cache_dir=d / "cache", workers=2, progress=False)
    return res, m, ids, d, time.perf_counter() - t0


@pytest.mark.dlib
def test_same_person_under_two_ids_found_and_kept_together(twin_ids):
    res, m, ids, _, _ = twin_ids
    same = res.pairs[(res.pairs["kind"] == "same_person") & res.pairs["outcome"].isin(["merged", "precaution"])]
    raw = m.table["subject_id"]
    true_id = raw.str.replace("_b", "", regex=False)
    a, b = same["line_a"].to_numpy() - 2, same["line_b"].to_numpy() - 2
    assert (true_id.to_numpy()[a] == true_id.to_numpy()[b]).all(), "a stranger was called the same person"
    assert (raw.to_numpy()[a] != raw.to_numpy()[b]).all(), "only pairs under two different ids are reported"
    assert (same["distance"] < res.choice.threshold).all() and res.choice.auto
    listed = res.pairs[res.pairs["kind"] == "same_person"]["distance"].to_numpy()
    assert (listed[:-1] <= listed[1:]).all(), "audit.csv lists pairs closest first"
    assert same["straddles_splits"].all()
    groups = merged_groups(res.pairs, raw)
    merged = [i for i in ids if groups[raw == i].iloc[0] == groups[raw == f"{i}_b"].iloc[0]]
    assert len(merged) >= 4, f"only {len(merged)} of 5 identities re-joined: {same['distance'].round(3).tolist()}"
    n_groups = groups.nunique()
    assert n_groups == raw.nunique() - len(merged), "merging joined more than the re-entered identities"
    detected = (res.photos["descriptor_source"] == "detected").mean()
    assert detected >= 0.9, f"face detection rate {detected:.2f} on 89x109 photos"


@pytest.mark.dlib
def test_second_run_hits_the_cache_and_gives_identical_results(twin_ids):
    res, m, _, d, cold = twin_ids
    assert res.computed == len(m.table) and res.cached == 0
    t0 = time.perf_counter()
    again = audit_manifest(m, cache_dir=d / "cache", workers=2, progress=False)
    warm = time.perf_counter() - t0
    assert again.computed == 0 and again.cached == len(m.table)
    assert warm < 1.0 and warm < cold / 5, f"warm {warm:.2f} s vs cold {cold:.2f} s"
    pd.testing.assert_frame_equal(again.pairs, res.pairs)
    pd.testing.assert_frame_equal(again.photos, res.photos)
    entries = list((d / "cache").rglob("*.json"))
    assert len([e for e in entries if e.parent.parent.name == "face"]) == len(m.table)
    assert not list((d / "cache").rglob("*.tmp")), "atomic writes leave no temporary files"


@pytest.mark.dlib
def test_output_names_no_path_and_no_raw_id(twin_ids, dup_audit):
    for res, m in ((twin_ids[0], twin_ids[1]), (dup_audit[0], dup_audit[1])):
        assert len(res.pairs) > 0
        text = res.pairs.to_csv(index=False) + res.photos.to_csv(index=False)
        leaks = [s for s in set(m.table["subject_id"]) if s in text]
        leaks += [p for p in m.table["path"] if p in text or p.rsplit("/", 1)[-1] in text]
        assert not leaks, f"audit output leaks {leaks[:3]}"
        assert str(m.source.parent) not in text
        assert set(res.pairs.columns) == {"pair", "kind", "distance", "decision", "verdict", "outcome", "line_a",
                                          "line_b", "subject_a", "subject_b", "split_a", "split_b",
                                          "straddles_splits", "same_subject", "detail"}
        assert res.pairs["pair"].tolist() == list(range(1, len(res.pairs) + 1)), "one key per pair"
        assert res.pairs[["subject_a", "subject_b"]].stack().str.fullmatch(r"[0-9a-f]{16}").all()


def test_unreadable_photo_is_a_reason_code_not_a_crash(celeba_manifest, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    rows = celeba_manifest.head(3)
    table = pd.DataFrame({"image": [*rows["image"], str(bad), str(tmp_path / "gone.jpg")],
                          "subject_id": ["a", "b", "c", "d", "e"]})
    res = audit_manifest(table, settings=AuditSettings(faces=False), cache_dir=tmp_path / "cache", workers=1,
                         progress=False)
    assert res.photos["status"].tolist() == ["ok", "ok", "ok", "not_an_image", "file_not_found"]
    assert res.pairs.empty and res.summary()["audit/unreadable_photos"] == 2
