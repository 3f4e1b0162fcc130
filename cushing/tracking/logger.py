"""What a run logs (`RunLogger`): params, per-epoch series (written by a background thread, several epochs per
call), final metrics linked to the logged model, tables, files, the cohort as a dataset, checkpoints, heartbeats."""
from __future__ import annotations

import math
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from cushing.tracking.connection import client
from cushing.tracking.liveness import _Heartbeat

__all__ = ["EPOCH_PREFIX", "RunLogger"]


EPOCH_PREFIX = "epoch/"  # per-epoch series: epoch/val/f1 at step = epoch; final results keep the bare names


def _clean(metrics: Mapping[str, float]) -> dict[str, float]:
    """MLflow forbids '=' in names; NaN is allowed and means 'not estimable'."""
    bad = next((k for k, v in metrics.items() if v is not None and "=" in k), None)
    if bad is not None:
        raise ValueError(f"metric name {bad!r} contains '=', which MLflow forbids")
    return {k: float(v) for k, v in metrics.items() if v is not None}


class _EpochWriter:
    """A background thread that writes per-epoch metrics with `log_batch`, several epochs per call when it falls
    behind. The training loop only enqueues. Unlike MLflow's async queue, which polls with a one-second timeout,
    flush and close return as soon as the queue is written (MLflow's cost up to a second each, three per run)."""

    _CLOSE = None

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.client = None

    def put(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name=f"epoch-metrics-{self.run_id[:8]}", daemon=True)
            self.thread.start()
        self._raise()
        self.q.put((int(time.time() * 1000), epoch, dict(metrics)))

    def flush(self) -> None:
        self.q.join()  # every item taken is marked done, written or not (errors are kept for _raise)
        self._raise()

    def close(self) -> None:
        if self.thread is not None:
            self.q.put(self._CLOSE)
            self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError(f"logging per-epoch metrics to MLflow failed: {err!r}") from err

    def _loop(self) -> None:
        while True:
            items = [self.q.get()]
            while not self.q.empty():  # this thread is the only one taking: what is there stays there
                items.append(self.q.get_nowait())
            try:
                self._write([it for it in items if it is not self._CLOSE])
            except Exception as e:  # surfaced on the next put/flush/close, in the training thread
                self.error = e
            for _ in items:
                self.q.task_done()
            if self._CLOSE in items:
                return

    def _write(self, epochs: list[tuple]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, ts, step) for ts, step, m in epochs for k, v in m.items()]
        self.client = self.client or client()
        for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], synchronous=True)


class RunLogger:
    """Everything a run logs, one method per kind of thing; every call names the run by id (not MLflow's active run)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._epochs = _EpochWriter(run_id)
        self.model_id: str | None = None  # set by the release module once the model is logged
        self._beat: _Heartbeat | None = None

    def start_heartbeat(self) -> None:
        """Tag the run with this process and beat (`liveness`): the next command that meets it after a SIGKILL
        marks it FAILED."""
        self._beat = _Heartbeat(self.run_id)
        self._beat.start()

    def note_checkpoint(self, path: Path, epoch: int, upload: bool = False) -> None:
        """Record the run's latest checkpoint (and upload it as the artifact checkpoint/checkpoint.pt if asked)."""
        self.set_tags({"checkpoint_epoch": epoch, "checkpoint_host": socket.gethostname()})
        if upload:
            client().log_artifact(self.run_id, str(path), "checkpoint")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._batches("tags", [RunTag(k, str(v)) for k, v in tags.items()], 100)

    def _batches(self, kind: str, items: list, size: int) -> None:
        """`log_batch` in calls of at most `size` items (it takes at most 100 tags or params, 1000 metrics)."""
        for i in range(0, len(items), size):
            client().log_batch(self.run_id, **{kind: items[i:i + size]}, synchronous=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params, keeping those `mlflow run` already logged from -P. A value that really differs from the one
        `mlflow run` logged (MLflow refuses to change a param) is logged as `resolved/<name>`."""
        from mlflow.entities import Param

        logged = client().get_run(self.run_id).data.params
        out = {}
        for k, v in params.items():
            text = "" if v is None else str(v)
            if k not in logged:
                out[k] = text
            # `mlflow run` records an empty -P value as the two characters '' (its shell quoting)
            elif logged[k] != text and not (logged[k] in ("''", '""') and text == "") and f"resolved/{k}" not in logged:
                out[f"resolved/{k}"] = text
        self._batches("params", [Param(k, v) for k, v in out.items()], 100)

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Queued for a background `log_batch` (one call per epoch, or fewer): the training loop never waits on the
        tracking server. Names get the `epoch/` prefix: `val/f1` of epoch 3 is `epoch/val/f1` at step 3."""
        self._epochs.put(epoch, {EPOCH_PREFIX + k: v for k, v in _clean(metrics).items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Final results, at step 0 by default; linked to the run's logged model once there is one (so the
        logged-model page, the Models tab and the registered version show them). A NaN (not estimable) stays on
        the run only: the logged-model page would draw it as 0."""
        import mlflow
        from mlflow.entities import Metric

        clean = _clean(metrics)
        finite = [(k, v) for k, v in clean.items() if math.isfinite(v)]
        for i in range(0, len(finite), 900):  # log_batch takes at most 1000 metrics per call
            mlflow.log_metrics(dict(finite[i:i + 900]), step=step, run_id=self.run_id, model_id=self.model_id)
        ts = int(time.time() * 1000)
        self._batches("metrics", [Metric(k, v, ts, step) for k, v in clean.items() if not math.isfinite(v)], 900)

    def log_dict(self, data: Any, name: str) -> None:
        client().log_dict(self.run_id, data, name)

    def log_table(self, df: pd.DataFrame, name: str) -> None:
        client().log_text(self.run_id, df.to_csv(index=False), name)

    def log_files(self, folder: str | Path, artifact_path: str | None = None) -> None:
        client().log_artifacts(self.run_id, str(folder), artifact_path)

    def log_dataset(self, table: pd.DataFrame, *, digest: str, name: str, context: str = "training") -> None:
        """The cohort as a run input: hashed subjects, split, sex and label only (no paths, no file names).

        Integer columns are logged as floats: MLflow's schema inference warns that an integer column cannot hold
        a missing value, and declaring them as doubles is the remedy it recommends. Concurrent workers logging
        the same dataset to one server can collide on its unique key; the loser retries and finds it."""
        import mlflow
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        table = table.astype({c: "float64" for c in table.columns if pd.api.types.is_integer_dtype(table[c])})
        source = CodeDatasetSource({"cohort_digest": digest, "note": "file paths withheld (faces are PHI)"})
        ds = mlflow.data.from_pandas(table, source=source, name=name, digest=digest[:36], targets="label").to_dict()
        fields = ("name", "digest", "source_type", "source", "schema", "profile")  # what mlflow.log_input sends
        entry = DatasetInput(Dataset(**{k: ds.get(k) for k in fields}), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for attempt in range(4):
            try:
                client().log_inputs(self.run_id, datasets=[entry])
                return
            except Exception:  # e.g. a unique violation on the dataset row another worker just created
                if attempt == 3:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def nest_under(self, parent_run_id: str | None) -> None:
        """Show this run as a child of `parent_run_id` in the MLflow UI (used for the run `mlflow run` created,
        whose parent cannot be chosen when it is created). The UI nests runs only within one experiment; across
        experiments the run records the parent as `related_run` instead."""
        if not parent_run_id or parent_run_id == self.run_id:
            return
        c = client()
        same = c.get_run(parent_run_id).info.experiment_id == c.get_run(self.run_id).info.experiment_id
        self.set_tags({"mlflow.parentRunId" if same else "related_run": parent_run_id})

    def flush(self) -> None:
        """Wait until every queued epoch is written (raises if writing failed)."""
        self._epochs.flush()

    def close(self) -> None:
        try:
            self._epochs.close()
        finally:
            if self._beat is not None:
                self._beat.stop()
