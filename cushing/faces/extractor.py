"""The face stage for single photos, as serving runs it: safe to call from many threads at once."""
from __future__ import annotations

import os
import queue
import threading
from contextlib import suppress

import numpy as np

from cushing.faces.detect import FaceResult, _Dlib, _result, _unprompted, detect, sam_prompt
from cushing.faces.sam import SamMasker
from cushing.faces.settings import FaceSettings

__all__ = ["FaceExtractor"]


class FaceExtractor:
    """The whole pipeline for single photos. The scoring server calls `predict` from a pool of threads; dlib's
    detector and shape predictor crash the process when two threads use one object (seen: signal 11 at 4 concurrent
    clients). Each call borrows one of at most `pool` dlib model sets (made on first need, about 100 MB each) and
    returns it; SAM, which keeps per-image state, runs one image at a time behind a lock."""

    def __init__(self, settings: FaceSettings, pool: int | None = None):
        self.s = settings
        self._free: queue.LifoQueue = queue.LifoQueue()
        self._made = 0
        self._limit = max(1, pool or min(4, os.cpu_count() or 1))
        self._lock = threading.Lock()
        self._sam = None
        self._sam_lock = threading.Lock()

    def _borrow(self) -> _Dlib:
        """A free model set, else a new one while under the limit, else wait for one. A set that fails to build
        frees its slot (the error goes to this caller), so waiting callers retry instead of waiting forever."""
        while True:
            with suppress(queue.Empty):
                return self._free.get_nowait()
            with self._lock:
                make = self._made < self._limit
                self._made += make
            if make:
                try:
                    return _Dlib(self.s)
                except BaseException:
                    with self._lock:
                        self._made -= 1
                    raise
            with suppress(queue.Empty):
                return self._free.get(timeout=1.0)

    def extract(self, rgb: np.ndarray) -> FaceResult:
        models = self._borrow()
        try:
            d = detect(rgb, models, self.s)
        finally:
            self._free.put(models)
        if isinstance(d, str):
            return FaceResult(d)
        if self.s.mask_method != "sam":
            return _unprompted(d, self.s)
        with self._sam_lock:
            if self._sam is None:
                self._sam = SamMasker(self.s.sam_checkpoint, self.s.sam_model_type, self.s.device)
            mask, score = self._sam.masks([d.image], [sam_prompt(d)])[0]
        return _result(d, mask, score, self.s)
