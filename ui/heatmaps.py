"""Heatmaps off the page's critical path: computed by a few shared worker threads, drawn when ready.

Why (bench/concurrent_reviewers.py, bench/app_bench.py): the Study review page used to compute each
view's heatmap inline, under one process-wide lock per model, before drawing that view's
probability. A reviewer's numbers, and their *Save* (a rerun waits for the running script to reach
its next ``st`` call), therefore waited for every other session's heatmaps.

Now the page draws every view with its numbers first, then calls :func:`draw_heatmaps`, which

* submits the views to one process-wide pool of ``BONEAI_HEATMAP_WORKERS`` threads, shared by all
  sessions (default: the cores left once one set of torch's intra-op threads is kept for the
  sessions' predictions and page runs, 1 to 4: one worker on 2 cores), so heatmaps never take more
  of the machine than that, however many reviewers ask at once;
* runs its workers at a lower CPU priority (``BONEAI_HEATMAP_NICE``, default 10; Linux keeps a nice
  value per thread): a heatmap takes whatever CPU the page runs and probabilities leave, so under
  several reviewers a *Save* or a probability is never queued behind someone's Grad-CAM;
* gives each worker its own copy of the network for Grad-CAM (CAM hooks and ``requires_grad`` are
  state on the module), so no lock is held and the shared predictor's forward pass is never touched;
* keeps results (and computations in flight) in a cache bounded by bytes, keyed by the loaded
  predictor, the file's digest, method and sex: a rerun (the reviewer's *Save*) or another session
  asking for the same view joins the same computation;
* waits in short steps and looks at ``st.session_state`` in between, which is where Streamlit
  checks for a rerun the user asked for without sending anything to the browser: a click (a save)
  interrupts the wait at once; the computation goes on in the pool and the next run picks it up.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import streamlit as st

from boneai.errors import BoneAIError

__all__ = ["Pending", "draw_heatmaps", "heatmap", "heatmap_future", "workers"]

POLL_S = 0.1  # how often a waiting page checks for a click while heatmaps are being computed


def workers() -> int:
    """Heatmap threads for the whole process: ``BONEAI_HEATMAP_WORKERS``, else the cores not kept for
    the sessions, in units of torch's intra-op threads (1 to 4)."""
    env = os.environ.get("BONEAI_HEATMAP_WORKERS", "").strip()
    if env:
        return max(1, int(env))
    import torch

    per_pass = max(1, torch.get_num_threads())
    return max(1, min(4, ((os.cpu_count() or 2) - per_pass) // per_pass))


def _lower_priority() -> None:
    """Pool initializer: this worker thread (and the threads it starts) at ``BONEAI_HEATMAP_NICE``."""
    try:
        tid = threading.get_native_id()
        nice = max(0, min(19, int(os.environ.get("BONEAI_HEATMAP_NICE", "10"))))
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))  # never raised
    except (ValueError, OSError, AttributeError):  # not Linux, or not allowed: normal priority
        pass


def _cache_bytes() -> int:
    return int(float(os.environ.get("BONEAI_HEATMAP_CACHE_MB", "256")) * 2**20)


class _WithModel:
    """The predictor, seen with another network in ``model`` (a worker's own copy for Grad-CAM)."""

    def __init__(self, predictor: Any, model: Any) -> None:
        self._predictor, self.model = predictor, model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)


def _uses_cam(predictor: Any) -> bool:
    """Whether :func:`boneai.explain.explain` runs Grad-CAM on ``predictor.model`` (mutating it)."""
    return predictor.task != "anomaly" and getattr(predictor, "fracture_map", None) is None


class _Service:
    """The worker pool, each worker's network copies, and the byte-bounded result cache."""

    def __init__(self, n_workers: int, max_bytes: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="boneai-heatmap",
                                       initializer=_lower_priority)
        self.max_bytes = max_bytes
        self.lock = threading.Lock()  # guards the cache only, never held during a computation
        self.cache: OrderedDict[tuple, tuple[Any, Future]] = OrderedDict()  # key -> (predictor, future)
        self.sizes: dict[tuple, int] = {}
        self.local = threading.local()
        self.copy_lock = threading.Lock()

    # -- per worker: own networks -------------------------------------------------------------------
    def _cam_view(self, predictor: Any) -> Any:
        """``predictor`` with this worker's own copy of its network (made once per worker and model)."""
        copies: OrderedDict = getattr(self.local, "copies", None) or OrderedDict()
        self.local.copies = copies
        entry = copies.get(id(predictor))
        if entry is None or entry[0] is not predictor:
            with self.copy_lock:  # nobody changes the shared network; the lock only spaces the copies out
                model = copy.deepcopy(predictor.model)
            entry = copies[id(predictor)] = (predictor, model)
            while len(copies) > 4:  # models replaced or switched: keep the recent ones
                copies.popitem(last=False)
        copies.move_to_end(id(predictor))
        return _WithModel(predictor, entry[1])

    def _compute(self, predictor: Any, radiograph: Any, method: str | None, male: bool | None) -> Any:
        from boneai import explain

        target = self._cam_view(predictor) if _uses_cam(predictor) else predictor
        return explain.explain(target, radiograph, method=method, male=male)

    # -- shared: results and computations in flight --------------------------------------------------
    def future(self, predictor: Any, digest: str, radiograph: Any, method: str | None,
               male: bool | None) -> Future:
        # The predictor object in the key (held by the entry, so its id is not reused while cached):
        # a model folder replaced on disk is a new predictor, and its heatmaps are computed afresh.
        if _uses_cam(predictor):  # None means the default method: one computation either way
            from boneai.explain import DEFAULT_CAM_METHOD

            method = method or DEFAULT_CAM_METHOD
        else:  # anomaly error maps and a localiser's own map have no method
            method = None
        key = (id(predictor), digest, method, male)
        with self.lock:
            entry = self.cache.get(key)
            if entry is not None:
                self.cache.move_to_end(key)
                return entry[1]
            fut = self.pool.submit(self._compute, predictor, radiograph, method, male)
            self.cache[key] = (predictor, fut)
        fut.add_done_callback(lambda f, key=key: self._settled(key, f))
        return fut

    def _settled(self, key: tuple, fut: Future) -> None:
        with self.lock:
            if self.cache.get(key, (None, None))[1] is not fut:
                return
            if fut.exception() is not None:  # not kept: asking again tries again
                del self.cache[key]
                return
            self.sizes[key] = int(getattr(fut.result().map, "nbytes", 0))
            total = sum(self.sizes.values())
            for old in list(self.cache):  # oldest first; never what is still being computed
                if total <= self.max_bytes:
                    break
                if old != key and old in self.sizes:
                    total -= self.sizes.pop(old)
                    del self.cache[old]


@st.cache_resource(show_spinner=False)
def _service() -> _Service:
    return _Service(workers(), _cache_bytes())


def heatmap_future(predictor: Any, digest: str, radiograph: Any, method: str | None = None,
                   male: bool | None = None) -> Future:
    """The :class:`boneai.explain.Heatmap` of one view, computed (or being computed) in the shared pool."""
    return _service().future(predictor, digest, radiograph, method, male)


def heatmap(predictor: Any, digest: str, radiograph: Any, method: str | None = None,
            male: bool | None = None) -> Any:
    """The heatmap of one view, waiting for it (for a report being downloaded)."""
    return heatmap_future(predictor, digest, radiograph, method, male).result()


@dataclass
class Pending:
    """A view drawn without its heatmap: where the overlay and its caption go when it is ready."""

    index: int
    digest: str
    radiograph: Any
    gray: np.ndarray
    image_slot: Any  # st.empty() holding the plain radiograph
    caption_slot: Any  # st.empty() for the heatmap's caption (or why there is none)


def draw_heatmaps(predictor: Any, pending: list[Pending], method: str | None, male: bool | None,
                  overlay: Callable[[np.ndarray, np.ndarray], np.ndarray], drawn: dict[int, np.ndarray],
                  plain: Callable[[Any], str] = str) -> None:
    """Put each view's heatmap into its slots as soon as it is ready; record the overlays in ``drawn``."""
    waiting: dict[Future, list[Pending]] = {}
    for item in pending:  # the same file twice in a study: one computation, drawn in both places
        fut = heatmap_future(predictor, item.digest, item.radiograph, method, male)
        waiting.setdefault(fut, []).append(item)
        if not fut.done():
            item.caption_slot.caption("Computing the heatmap...")
    while waiting:
        done, _ = wait(list(waiting), timeout=POLL_S, return_when=FIRST_COMPLETED)
        if not done:
            # Reading session state is a yield point: Streamlit stops this run here for a rerun the
            # user asked for (a save, a new setting). The computation carries on in the pool and the
            # next run finds it.
            _ = "_boneai_heatmaps_waiting" in st.session_state
            continue
        for fut in done:
            for item in waiting.pop(fut):
                _draw(fut, item, overlay, drawn, plain)


def _draw(fut: Future, item: Pending, overlay: Callable[[np.ndarray, np.ndarray], np.ndarray],
          drawn: dict[int, np.ndarray], plain: Callable[[Any], str]) -> None:
    try:
        heat = fut.result()
    except BoneAIError as exc:
        item.caption_slot.warning(plain(exc))
        return
    except Exception as exc:  # an explanation failure must not hide the prediction
        item.caption_slot.warning(plain(f"Heatmap unavailable for this view ({type(exc).__name__})."))
        return
    shown = overlay(item.gray, heat.map)
    drawn[item.index] = shown
    item.image_slot.image(shown, width="stretch")
    item.caption_slot.caption(f"Heatmap ({heat.method.replace('_', ' ')}), "
                              f"hottest point at x={heat.peak[0]}, y={heat.peak[1]}")
