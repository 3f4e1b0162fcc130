"""`cushing bench serve`: latency and throughput of a served model as clients see them. Each model URI is served by
`mlflow models serve` on a free loopback port (or a running server is given by URL); clients post one photo per
request (base64 JPEG/PNG) at 1, 4 and 8 at once. Whether the face stage ran is read from the answers (`face_status` ok
vs not_applied), not assumed.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from cushing.ops.stack import free_port, stop_group, wait_http

__all__ = ["bench_serve", "serve_model"]


@contextlib.contextmanager
def serve_model(model_uri: str, timeout: float = 300.0) -> Iterator[str]:
    """`mlflow models serve -m URI` on a free 127.0.0.1 port for the block; yields its base URL."""
    port = free_port()
    with tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False) as fh:
        log = Path(fh.name)
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                                 "local", "--host", "127.0.0.1", "-p", str(port)], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout, proc=proc, log=log)
        yield f"http://127.0.0.1:{port}"
    finally:
        # the whole group (the server's workers too); quiet when it is gone already (a server that failed to start,
        # whose error is the one to see); SIGKILL for one that ignores SIGTERM
        stop_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        log.unlink(missing_ok=True)


def _post(session, url: str, photo: str) -> tuple[float, int, str]:
    t = time.perf_counter()
    r = session.post(f"{url}/invocations", json={"dataframe_records": [{"image": photo}]}, timeout=300)
    status = r.json()["predictions"][0].get("face_status", "") if r.status_code == 200 else ""
    return time.perf_counter() - t, r.status_code, status


def _load(url: str, photos: list[str], clients: int, per_client: int) -> dict:
    import requests

    def client(k: int) -> list[tuple[float, int, str]]:
        with requests.Session() as s:
            return [_post(s, url, photos[(k * per_client + i) % len(photos)]) for i in range(per_client)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    off = results and all(r[2] == "not_applied" for r in results)
    return {"clients": clients, "requests": len(results), "errors": sum(r[1] != 200 for r in results),
            "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "requests_per_s": len(results) / wall, "face_stage": "off" if off else "on"}


def bench_serve(*, model_uris: list[str], urls: list[str], photos: list[str], clients: tuple[int, ...] = (1, 4, 8),
                per_client: int = 20, out: str = "bench_serve.json") -> list[dict]:
    """Rows (target, face stage, clients, p50/p95 ms, requests/s, errors), printed and written as JSON."""
    import platform

    import requests

    data = [base64.b64encode(Path(p).read_bytes()).decode() for p in photos]
    rows: list[dict] = []

    def measure(label: str, url: str) -> None:
        with requests.Session() as s:
            for _ in range(2):  # warm-up: the first requests load dlib's models; that is not latency
                _post(s, url, data[0])
        for n in clients:
            row = {"target": label, **_load(url, data, n, per_client)}
            rows.append(row)
            print(f"{label[:48]:48s} face stage {row['face_stage']:3s} clients {n}: p50 {row['p50_ms']:7.1f} ms  "
                  f"p95 {row['p95_ms']:7.1f} ms  {row['requests_per_s']:6.1f} req/s  errors {row['errors']}",
                  flush=True)
    for url in urls:
        measure(url, url)
    for uri in model_uris:
        with serve_model(uri) as url:
            measure(uri, url)
    host = f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})"
    Path(out).write_text(json.dumps({"server_host": host, "photos": len(photos), "per_client": per_client,
                                     "rows": rows}, indent=1))
    return rows
