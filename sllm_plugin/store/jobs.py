"""Per-tier job queues: fetches into a tier and promotions between tiers, one at a time.

As in ServerlessLLM, each tier's device runs one transfer at a time, in order, so a job's
completion time is predictable (the queue's drain time is what placement adds to a load).
Submitting a job for a model that already has one queued or running on that tier returns the
existing job: two prefetches of one model are one download.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .bandwidth import Bandwidth

logger = logging.getLogger("sllm_plugin.store")
_ids = itertools.count(1)


@dataclass
class Job:
    kind: str  # "fetch" | "promote"
    model: str
    tier: str
    nbytes: int
    run: Callable[[], None] = field(repr=False)
    bandwidth: Bandwidth | None = field(default=None, repr=False)  # refined by this job
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "queued"  # queued | running | done | failed
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    error_status: int | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def estimate_s(self) -> float | None:
        return self.bandwidth.seconds_for(self.nbytes) if self.bandwidth else None

    def remaining_s(self) -> float | None:
        estimate = self.estimate_s()
        if estimate is None or self.state in ("done", "failed"):
            return None if estimate is None else 0.0
        if self.state == "running" and self.started is not None:
            return max(0.0, estimate - (time.time() - self.started))
        return estimate

    def describe(self) -> dict:
        return {
            "id": self.id, "kind": self.kind, "model": self.model, "tier": self.tier,
            "bytes": self.nbytes, "state": self.state, "created": self.created,
            "started": self.started, "finished": self.finished, "error": self.error,
            "estimated_s": self.estimate_s(),
            "seconds": (self.finished - self.started) if self.finished and self.started else None,
        }


def status_for(error: Exception) -> int:
    """The HTTP status a failed job answers with: what the error says, or what its kind means
    (no room on disk: 507; a source or checkpoint that is not valid: 422; else 502)."""
    from ..format.errors import CheckpointWriteError, FormatError
    from .sources import SourceError

    status = getattr(error, "status", None)
    if isinstance(status, int):
        return status
    if isinstance(error, CheckpointWriteError):
        return 507
    if isinstance(error, (FormatError, SourceError)):
        return 422
    return 502


class TierQueue:
    """A FIFO of jobs for one tier, run by one worker thread."""

    def __init__(self, tier: str, on_finish: Callable[[Job], None] | None = None) -> None:
        self.tier = tier
        self.on_finish = on_finish  # told of each job once it has finished, done or failed
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # model -> active (queued or running) job
        self._history: list[Job] = []
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name=f"sllm-{tier}-queue",
                                        daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            active = self._jobs.get(job.model)
            if active is not None:
                return active
            self._jobs[job.model] = job
            self._history.append(job)
            del self._history[:-100]
        self._queue.put(job)
        return job

    def active(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.id)

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return next((j for j in self._history if j.id == job_id), None)

    def drain_s(self) -> float | None:
        """Estimated seconds until every queued job has finished (None: no estimate)."""
        total = 0.0
        for job in self.active():
            remaining = job.remaining_s()
            if remaining is None:
                return None
            total += remaining
        return total

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            job.state, job.started = "running", time.time()
            try:
                job.run()
            except Exception as e:  # reported on the job; the queue goes on
                job.state, job.error = "failed", str(e) or type(e).__name__
                job.error_status = status_for(e)
                logger.warning("%s of %s into %s failed: %s", job.kind, job.model, job.tier,
                               job.error)
            else:
                job.state = "done"
            job.finished = time.time()
            if job.state == "done" and job.bandwidth is not None:
                job.bandwidth.observe(job.nbytes, job.finished - job.started)
            with self._lock:
                self._jobs.pop(job.model, None)
            if self.on_finish is not None:  # before `done`: a waiter sees it counted
                try:
                    self.on_finish(job)
                except Exception:  # a hook must not stop the queue or hang its waiters
                    logger.exception("on_finish of job %d", job.id)
            job.done.set()
