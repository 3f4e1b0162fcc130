"""A served model that applies the face stage, under what users throw at it: many concurrent clients, photos with
no face, bad photos in a batch (a row each, with its status), requests wrong as a whole (400 with the reason). The
server stays up, every answer is valid JSON, and no answer echoes the photo."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import requests
from PIL import Image

from cushing.ops.stack import free_port, wait_http
from tests.conftest import env_vars

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.dlib]


@pytest.fixture(scope="module")
def face_model(tmp_path_factory, celeba_manifest, cushing_home):
    """A tiny model trained on face crops of real photos, so serving runs dlib on every request."""
    from cushing.config import TrainConfig
    from cushing.workflows.experiment import run_single
    from cushing.faces.pipeline import extract_faces
    from cushing.faces.settings import FaceSettings

    d = tmp_path_factory.mktemp("face-model")
    photos = pd.concat([celeba_manifest[celeba_manifest["label"] == 0].head(24),
                        celeba_manifest[celeba_manifest["label"] == 1].head(12)])
    photos.to_csv(d / "photos.csv", index=False)
    out = extract_faces(d / "photos.csv", d / "faces", FaceSettings(), cache_dir=d / "cache", progress=False,
                        skip_bad_photos=True)  # a few have no face dlib finds
    uri = f"sqlite:///{d / 'mlflow.db'}"
    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        s = run_single(TrainConfig(data=str(out.manifest), model="resnet18", pretrained=False, epochs=1, img_size=48,
                                   bootstrap=0, cam=False, min_positives=1, allow_one_class_subgroups=True,
                                   experiment="serving"), progress=False)  # few female patients in these photos
    raw = out.report.loc[out.report["status"] == "ok", "path"].tolist()
    return {"uri": uri, "model_uri": s.model_uri, "photos": raw, "dir": d}


@pytest.fixture(scope="module")
def server(face_model):
    port = free_port()
    log = face_model["dir"] / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": face_model["uri"], "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", face_model["model_uri"],
                                 "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc=proc, log=log)
        yield {"url": f"http://127.0.0.1:{port}", "proc": proc, "log": log}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_eight_concurrent_clients_twenty_requests_each(server, face_model):
    photos = [_b64(open(p, "rb").read()) for p in face_model["photos"][:8]]
    blank = io.BytesIO()
    Image.new("RGB", (120, 140), (200, 180, 160)).save(blank, "JPEG")

    def client(k: int) -> list[tuple[int, str]]:
        out = []
        with requests.Session() as s:
            for i in range(20):
                body = {"dataframe_records": [{"image": photos[(k + i) % len(photos)]}, {"image": _b64(blank.getvalue())}]}
                r = s.post(f"{server['url']}/invocations", json=body, timeout=120)
                out.append((r.status_code, r.text))
        return out
    with cf.ThreadPoolExecutor(8) as pool:
        answers = [a for batch in pool.map(client, range(8)) for a in batch]
    assert len(answers) == 160 and all(code == 200 for code, _ in answers), {c for c, _ in answers}
    for _, text in answers:
        rows = _strict_json(text)["predictions"]  # strictly valid JSON: NaN would fail here
        assert rows[0]["face_status"] == "ok" and 0 <= rows[0]["probability"] <= 1
        assert rows[1]["face_status"] == "no_face" and rows[1]["probability"] is None and rows[1]["label"] == -1
    assert server["proc"].poll() is None and requests.get(f"{server['url']}/ping", timeout=10).status_code == 200


def _echoes(text: str, value: str) -> bool:
    """Whether the answer repeats any 12 characters of a submitted value."""
    return any(value[i:i + 12] in text for i in range(0, max(1, len(value) - 12), 6))


def _post(url: str, body) -> requests.Response:
    """As curl sends it: the JSON text with its content type."""
    return requests.post(f"{url}/invocations", data=json.dumps(body), timeout=120,
                         headers={"Content-Type": "application/json"})


def test_one_batch_answers_every_photo_each_with_its_status(server, face_model):
    """Good, no-face, truncated, not-an-image, too-large, empty, not-base64 and non-string rows in one request: HTTP
    200, a row per photo in order, and only the good ones scored."""
    from cushing.release.pyfunc import MAX_IMAGE_B64

    raw = open(face_model["photos"][0], "rb").read()
    blank = io.BytesIO()
    Image.new("RGB", (120, 140), (200, 180, 160)).save(blank, "JPEG")
    rows = {"ok": _b64(raw), "no_face": _b64(blank.getvalue()), "truncated": _b64(raw[: len(raw) // 2]),
            "not_an_image": _b64(b"patient 4711, notes from the clinic visit, not a photo at all"),
            "too_large": "A" * (MAX_IMAGE_B64 + 4), "empty_file": "", "not_base64": "%%% not base64 %%%"}
    records = [{"image": v} for v in rows.values()] + [{"image": 1234567890123456}, {"image": [_b64(raw)]}]
    r = _post(server["url"], {"dataframe_records": records})
    assert r.status_code == 200, r.text[:300]
    got = pd.DataFrame(_strict_json(r.text)["predictions"])
    assert got["face_status"].tolist() == [*rows, "not_base64", "not_base64"]
    assert 0 <= got["probability"][0] <= 1 and got["label"][0] in (0, 1)
    assert got["probability"][1:].isna().all() and (got["label"][1:] == -1).all()
    assert not any(_echoes(r.text, v) for v in list(rows.values())[1:4]), "the answer repeats a photo"


@pytest.mark.parametrize("name,records,reason", [
    ("no image column", [{"photo": "PHOTO"}],
     "expected a column named 'image' (base64 photo); got columns ['photo']"),
    ("the issue's request", [{"photo": "abc"}], "got columns ['photo']"),
    ("empty batch", [], "no rows to score"),
    ("too many rows", [{"image": "PHOTO"}] * 257, "257 rows in one request; at most 256"),
])
def test_a_request_wrong_as_a_whole_gets_400_with_its_reason_as_the_message(server, face_model, name, records,
                                                                            reason):
    photo = _b64(open(face_model["photos"][1], "rb").read())
    records = [{k: photo if v == "PHOTO" else v for k, v in rec.items()} for rec in records]
    r = _post(server["url"], {"dataframe_records": records})
    assert r.status_code == 400, (name, r.status_code, r.text[:300])
    body = _strict_json(r.text)
    assert reason in body["message"] and "stack_trace" not in body, body
    assert not _echoes(r.text, photo), f"{name}: the answer repeats the photo: {r.text[:300]}"
    assert requests.get(f"{server['url']}/ping", timeout=10).status_code == 200


def test_bench_serve_reports_latency_and_throughput(server, face_model, tmp_path, capsys):
    from cushing.workflows.bench_serve import bench_serve

    rows = bench_serve(model_uris=[], urls=[server["url"]], photos=face_model["photos"][:4], clients=(1, 4),
                       per_client=3, out=str(tmp_path / "serve.json"))
    saved = json.loads((tmp_path / "serve.json").read_text())
    assert [r["clients"] for r in saved["rows"]] == [1, 4] and saved["rows"] == rows
    for r in rows:
        assert r["errors"] == 0 and r["face_stage"] == "on" and r["requests"] == 3 * r["clients"]
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["requests_per_s"] > 0
    assert "clients 4: p50" in capsys.readouterr().out


def test_face_pool_answers_every_caller_when_dlib_models_fail_to_load(tmp_path, monkeypatch, celeba_dir):
    """A serving environment without dlib's model files: every concurrent request gets the load error, none
    waits forever for a model set that was never built (the pool used to leak its slots)."""
    import sys
    import threading

    import numpy as np

    from cushing.faces.extractor import FaceExtractor
    from cushing.faces.settings import FaceSettings

    pkg = tmp_path / "face_recognition_models"
    (pkg / "models").mkdir(parents=True)  # installed, but its .dat files are missing
    (pkg / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "face_recognition_models", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    rgb = np.asarray(Image.open(sorted((celeba_dir / "images").glob("*.jpg"))[0]).convert("RGB"))
    fx = FaceExtractor(FaceSettings(mask="none"), pool=1)
    errors: list[BaseException] = []

    def call():
        try:
            fx.extract(rgb)
        except BaseException as e:  # the load error, reported to this caller
            errors.append(e)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a caller is stuck waiting for a dlib model set"
    assert len(errors) == 6
    assert all("shape_predictor_68_face_landmarks.dat" in str(e) or "Unable to open" in str(e) for e in errors), errors
