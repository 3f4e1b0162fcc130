"""`cushing bench`: the engine's epoch against the compute floor, whole runs, the face stage, served models."""
from __future__ import annotations

import argparse

from cushing.cli.options import Command
from cushing.config import COMPILE_MODES


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", default="train", choices=["train", "run", "faces", "serve"],
                   help="train: engine epoch vs compute floor; run: whole runs split into training and the rest "
                        "(--models: the first one); faces: face-stage photos/s cold and warm; serve: latency and "
                        "requests/s of served models (--model-uri, --url) at 1, 4 and 8 concurrent clients")
    p.add_argument("--model-uri", action="append", default=[], help="serve: a model to serve and time (repeatable)")
    p.add_argument("--url", action="append", default=[], help="serve: an already running scoring server")
    p.add_argument("--clients", default="1,4,8", help="serve: concurrent clients, comma list")
    p.add_argument("--requests", type=int, default=20, help="serve: requests per client")
    p.add_argument("--models", default="resnet50,vit_b_16,swin_b,dinov2_b")
    p.add_argument("--frozen", default="dinov2_b", help="comma list also benchmarked with a frozen backbone")
    p.add_argument("--epochs", type=int, default=10, help="timed epochs after warm-up (median reported)")
    p.add_argument("--repeats", type=int, default=3,
                   help="run: in-process runs timed (median; after a warm-up run on CUDA)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default="none", choices=list(COMPILE_MODES),
                   help="torch.compile mode of the fine-tuning engine (the floor stays eager)")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--manifest", default=None, help="faces: photos to time (default: a synthetic set)")
    p.add_argument("--limit", type=int, default=0, help="faces: at most this many photos")
    p.add_argument("--sam-checkpoint", default=None)


def _bench(ns: argparse.Namespace) -> int:
    if ns.what == "serve":
        from cushing.workflows.bench_serve import bench_serve
        from cushing.data.manifest import load_manifest
        from cushing.data.checks import resolve_data

        photos = load_manifest(resolve_data(ns.manifest or "demo"), check_images=False).table["path"].tolist()
        bench_serve(model_uris=ns.model_uri, urls=ns.url, photos=photos[: ns.limit or None],
                    clients=tuple(int(c) for c in ns.clients.split(",")), per_client=ns.requests,
                    out=ns.out if ns.out != "bench.json" else "bench_serve.json")
    elif ns.what == "faces":
        from cushing.workflows.bench import bench_faces

        bench_faces(manifest=ns.manifest, limit=ns.limit, sam_checkpoint=ns.sam_checkpoint, out=ns.out)
    elif ns.what == "run":
        from cushing.workflows.bench_run import bench_run

        bench_run(model=ns.models.split(",")[0], img_size=ns.img_size, epochs=ns.epochs, device=ns.device,
                  out=ns.out, repeats=ns.repeats)
    else:
        from cushing.workflows.bench import run_bench

        rows = run_bench(models=[m for m in ns.models.split(",") if m],
                         frozen=[m for m in ns.frozen.split(",") if m], epochs=ns.epochs, img_size=ns.img_size,
                         device=ns.device, out=ns.out, compile=ns.compile)
        return int(any(r.note.startswith("error") for r in rows))  # the others were measured and written all the same
    return 0


COMMANDS: dict[str, Command] = {
    "bench": ("time the engine's epoch against the compute floor (or the face stage)", _bench_args, _bench)}
