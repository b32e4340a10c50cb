"""Logging into one MLflow run without ever costing the work: calls go into a bounded queue that
a background thread sends in order, so a store that hangs or fails never holds up training; a
failing call is kept, warned about once and retried (at most once a minute, and whenever the
stage waits for the queue); what could not be logged is summed up at the end."""

from __future__ import annotations

import collections
import math
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from onecycle import progress
from onecycle.params_file import flatten
from onecycle.redact import redact, redact_values

RETRY_SECONDS = 60  # after a failed call, how long the sender waits before trying again
FLUSH_SECONDS = 30  # how long a stage's end waits for the queue to empty
SAY_WAITING_SECONDS = 5  # a wait longer than this says what it waits for
CALL_NOW_SECONDS = 120  # how long a call whose value the stage needs (the model's id) may take
MAX_PENDING = 10_000  # calls kept while the store is away; the oldest beyond are given up
TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".csv", ".txt", ".md")  # logged redacted


def short_error(exc: BaseException) -> str:
    """The exception in one line: its type and the line that names the cause (SQLAlchemy's
    text starts with advice about autoflush; the database's own error is on a later line)."""
    text = str(exc).strip().splitlines()
    cause = next((ln for ln in text if ln.startswith(("(sqlite3.", "(psycopg"))), None)
    return f"{type(exc).__name__}: {(cause or (text[0] if text else ''))[:200]}"


@dataclass(frozen=True, eq=False)
class Call:
    """One queued MLflow call: ``what`` names it in messages; a metric batch also keeps its
    metric names and step range, a file its path, for the closing summary."""

    what: str
    fn: Callable[[], None]
    metrics: tuple[str, ...] = ()
    steps: tuple[int, int] | None = None
    file: str | None = None


def some_names(names: Sequence[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class Recorder:
    """Logs into one run. Every call is queued and sent by a background thread, in order; a
    failing call costs no work: it is kept, warned about once and retried; :meth:`flush` waits
    (with a time limit) for the queue, and :meth:`unlogged` lists what is left."""

    def __init__(self, run_id: str, experiment_id: str, uri: str):
        self.run_id, self.experiment_id, self.uri = run_id, experiment_id, uri
        self.shown_uri = redact(uri)  # what messages name: no password, no signed query
        self._pending: collections.deque[Call] = collections.deque()
        self._dropped: list[Call] = []  # given up: the queue was full
        self._cond = threading.Condition()
        self._retry_now = threading.Event()
        self._sender: threading.Thread | None = None
        self._tries = 0  # calls begun so far, failed or not
        self._failed_try = 0  # the number of the last try that failed
        self._sent = 0  # calls sent so far: a flush waits on while they keep going out
        self._warned = False
        self._mlflow_client = None
        self.last_error: BaseException | None = None

    def _call(self, what: str, fn: Callable[[], None], **about) -> None:
        with self._cond:
            if len(self._pending) >= MAX_PENDING:
                self._dropped.append(self._pending.popleft())
            self._pending.append(Call(what, fn, **about))
            self._cond.notify_all()
            if self._sender is None:
                self._sender = threading.Thread(target=self._send, name="mlflow-log", daemon=True)
                self._sender.start()

    def _send(self) -> None:
        """The sender: the queue's head, in order, forever (a daemon: it never holds up exit)."""
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                call = self._pending[0]
                self._tries += 1
                this_try = self._tries
            try:
                call.fn()
            except Exception as exc:  # noqa: BLE001 - logging must never stop the work
                with self._cond:
                    self.last_error = exc
                    self._failed_try = this_try
                    self._cond.notify_all()
                if not self._warned:
                    self._warned = True
                    progress.say(
                        f"warning: MLflow at {self.shown_uri} failed ({short_error(exc)}) while logging "
                        f"{call.what}; the work goes on and logging is retried"
                    )
                self._retry_now.wait(RETRY_SECONDS)
                self._retry_now.clear()
                continue
            with self._cond:
                if self._pending and self._pending[0] is call:  # (not given up meanwhile)
                    self._pending.popleft()
                    self._sent += 1
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the queue is sent (True), a try begun after this call fails, or no call
        has gone out for ``timeout`` seconds (default ``FLUSH_SECONDS``): a store that hangs
        (False). A try already under way that fails does not count: it may have begun before
        the store came back. A slow store that keeps taking calls (a large upload, one call at
        a time) is waited for. A sender waiting to retry retries at once."""
        timeout = FLUSH_SECONDS if timeout is None else timeout
        with self._cond:
            begun, sent = self._tries, self._sent
            if self._pending:
                self._retry_now.set()
            deadline = time.monotonic() + timeout
            say_at = time.monotonic() + SAY_WAITING_SECONDS
            while self._pending and self._failed_try <= begun:
                if self._sent != sent:  # progress: the time limit counts from the last call
                    sent, deadline = self._sent, time.monotonic() + timeout
                now = time.monotonic()
                if now >= say_at:  # never a silent wait: what is left, and for how long
                    say_at = math.inf
                    progress.say(
                        f"waiting for MLflow at {self.shown_uri} to take "
                        f"{self._pending[0].what} ({len(self._pending)} call(s) left), up to "
                        f"{deadline - now:.0f} s more; the stage's outputs are written"
                    )
                left = min(deadline, say_at) - now
                if left <= 0:
                    break
                self._cond.wait(left)
            return not self._pending

    def unlogged(self) -> list[Call]:
        """The calls not sent: given up (the queue was full), then still waiting."""
        with self._cond:
            return self._dropped + list(self._pending)

    def _client(self):
        import mlflow

        if self._mlflow_client is None:
            self._mlflow_client = mlflow.MlflowClient(self.uri)
        return self._mlflow_client

    def log_params(self, params: dict) -> None:
        """Nested dicts become dotted keys: ``{"train": {"epochs": 24}}`` -> ``train.epochs``.
        Values are redacted (a URL's password, a signed query)."""
        from mlflow.entities import Param

        flat = redact_values(flatten(params))
        batch = [Param(k, str(v)) for k, v in flat.items()]
        self._call("params", lambda: self._client().log_batch(self.run_id, params=batch))

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, redact(str(v))) for k, v in tags.items()]
        self._call("tags", lambda: self._client().log_batch(self.run_id, tags=batch))

    def log_metrics(
        self, values: dict, step: int | None = None, prefix: str = "", model_id: str | None = None
    ) -> None:
        """The numbers of ``values`` at ``step`` as ``<prefix><key>``; None and non-numbers are
        left out. With ``model_id`` they are also the metrics of that logged model."""
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        self.log_series([{**numbers, "_step": step or 0}], list(numbers), "_step", prefix, model_id)

    def log_series(
        self,
        rows: list[dict],
        keys: list[str],
        step_key: str = "step",
        prefix: str = "",
        model_id: str | None = None,
    ) -> None:
        """Every row's ``keys`` as metrics ``<prefix><key>`` at the row's step, 1000 values a
        request. The prefix is the UI's chart section (``train/``, ``eval/``, ...)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(f"{prefix}{k}", float(r[k]), now, int(r[step_key]), model_id=model_id)
            for r in rows
            for k in keys
            if k in r
        ]
        for start in range(0, len(metrics), 1000):
            chunk = metrics[start : start + 1000]
            steps = f"{chunk[0].step}..{chunk[-1].step}" if len(rows) > 1 else f"{chunk[0].step}"
            names = tuple(sorted({m.key for m in chunk}))
            self._call(
                f"metrics {some_names(names)} at step {steps}",
                lambda c=chunk: self._client().log_batch(self.run_id, metrics=c),
                metrics=names,
                steps=(chunk[0].step, chunk[-1].step),
            )

    def log_datasets(self, datasets: list[tuple[object, str]]) -> None:
        """``(mlflow.data Dataset, context)`` pairs as the run's inputs (the UI's Dataset column)."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = [
            DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
            for ds, context in datasets
        ]
        self._call("datasets", lambda: self._client().log_inputs(self.run_id, datasets=inputs))

    def call_now(self, what: str, fn: Callable[[], object]) -> object | None:
        """``fn()``'s value, or None if the store failed (then it is retried like the rest and
        listed at the end if it never succeeds)."""
        box: dict = {}
        self._call(what, lambda: box.setdefault("value", fn()))
        self.flush(CALL_NOW_SECONDS)
        return box.get("value")

    def log_files(self, *local: str | Path, artifact_path: str | None = None) -> None:
        """Text files (params.yaml, metrics) go up redacted: a copy when they hold a secret."""
        for path in local:
            self._call(
                f"file {path}",
                lambda p=Path(path): self._log_file(p, artifact_path),
                file=str(path),
            )

    def _log_file(self, path: Path, artifact_path: str | None) -> None:
        try:
            text = path.read_text() if path.suffix in TEXT_SUFFIXES else None
        except (OSError, UnicodeDecodeError):
            text = None
        if text is None or redact(text) == text:
            self._client().log_artifact(self.run_id, str(path), artifact_path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / path.name
            copy.write_text(redact(text))
            self._client().log_artifact(self.run_id, str(copy), artifact_path)
