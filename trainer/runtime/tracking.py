"""The run's metrics mirrored where teams look for them (``train.tracking``), by rank 0 only.

    tracker = Tracker(cfg, env.is_main, run.lr_factor, table.has_fused_optimizer)
    with tracker:                                   # closed as FINISHED, FAILED or KILLED
        tracker.start(global_step)                  # opens the backends (rank 0), once
        tracker.log_step(global_step, losses)       # at each logged step (train.log_every)
        tracker.log_epoch(record, global_step)      # each epoch record of metrics.json

``metrics.json`` is the source of record: the report's curves read its epoch records, and
:meth:`Tracker.log_epoch` logs exactly those records (every number of a record, nested ones as
``valid/NDCG@20``), so TensorBoard, MLflow and the report show the same values. The logged steps
add what metrics.json does not keep: the running loss means of the epoch (what the progress bar
shows), the learning rates and the wall-clock seconds per step. Every value is one the loop has
already read back (``Trainer.host_reads``) or wall-clock time: tracking adds no host read.

Backends:

- ``tensorboard``: event files in ``<run_dir>/tensorboard/`` (step axis: the global optimizer
  step; an epoch record at the step that ended it). A resumed run hides the events after its
  checkpoint's step (TensorBoard's ``purge_step``). A remote run directory (``s3://``...) is
  written in a local temporary folder and its files are copied there at each epoch end and at
  the close;
- ``mlflow``: one MLflow run per training process, in the experiment ``train.mlflow_experiment``
  of ``MLFLOW_TRACKING_URI`` (required), with the resolved config as parameters and the run
  directory as the tag ``mqsa_ted.run_dir``; MLflow refuses ``@`` in a metric name, so
  ``valid/NDCG@20`` is logged as ``valid/NDCG_at_20``. Needs the ``tracking`` extra.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any, Protocol

from mqsa_core.config import Config, tracker_names
from mqsa_core.errors import UserError
from mqsa_core.log import get_logger
from mqsa_core.storage import protocol_of, url_to_fs
from trainer.runtime.interrupt import Interrupted

log = get_logger(__name__)

TENSORBOARD_DIR = "tensorboard"


class TrackingError(UserError):
    """A tracker named in ``train.tracking`` cannot be used here (the message says why)."""


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of ``record`` (nested dicts joined with ``/``), booleans and others left
    out: ``{"loss": 1.0, "valid": {"HR@5": 0.5}}`` -> ``{"loss": 1.0, "valid/HR@5": 0.5}``."""
    values: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            values.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            values[f"{prefix}{key}"] = float(value)
    return values


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of an epoch record: its top-level numbers under ``epoch/`` (``epoch/loss``,
    ``epoch/epoch``...), its evaluations under their split (``valid/NDCG@20``)."""
    top = {k: v for k, v in record.items() if not isinstance(v, dict)}
    nested = {k: v for k, v in record.items() if isinstance(v, dict)}
    return {**flatten(top, "epoch/"), **flatten(nested)}


class Backend(Protocol):
    """One tracking tool."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self, status: str) -> None: ...


class TensorBoardBackend:
    """Event files in ``<run_dir>/tensorboard/`` (a remote run dir: written locally, copied)."""

    def __init__(self, run_dir: str, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        url = f"{run_dir.rstrip('/')}/{TENSORBOARD_DIR}"
        self.fs, path = url_to_fs(url)
        self.remote = None if protocol_of(self.fs) in ("file", "local") else path
        self.local = tempfile.mkdtemp(prefix="mqsa-tensorboard-") if self.remote else path
        self.writer = SummaryWriter(self.local, purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        walltime = time.time()
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step, walltime=walltime)

    def flush(self) -> None:
        self.writer.flush()
        if self.remote is not None:  # whole files: event files are small
            for root, _, files in os.walk(self.local):
                for name in files:
                    local = os.path.join(root, name)
                    relative = os.path.relpath(local, self.local)
                    self.fs.put_file(local, f"{self.remote}/{relative}")

    def close(self, status: str) -> None:
        self.writer.close()
        self.flush()
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)


def mlflow_name(tag: str) -> str:
    """A metric name MLflow accepts (no ``@``): ``valid/NDCG@20`` -> ``valid/NDCG_at_20``."""
    return tag.replace("@", "_at_")


class MlflowBackend:
    """One MLflow run in ``train.mlflow_experiment`` at ``MLFLOW_TRACKING_URI``."""

    def __init__(self, cfg: Config, start_step: int) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI
        name = cfg.train.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        run_dir = cfg.train.run_dir
        tags = {"mqsa_ted.run_dir": run_dir, "mqsa_ted.start_step": str(start_step)}
        self.run_id = self.client.create_run(
            experiment_id, run_name=os.path.basename(run_dir.rstrip("/")), tags=tags
        ).info.run_id
        params = [Param(k, str(v)) for k, v in flatten_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(k), v, stamp, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def flush(self) -> None:
        """MLflow's client writes each batch as it is logged."""

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def flatten_config(cfg: Config) -> dict[str, Any]:
    """``section.key -> value`` of the resolved config."""
    return {f"{s}.{k}": v for s, body in cfg.to_dict().items() for k, v in body.items()}


def check_available(names: tuple[str, ...]) -> None:
    """Raise :class:`TrackingError` when a named tracker cannot run here (on every rank, before
    rank 0 opens anything, so no rank waits for one that failed)."""
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise TrackingError(
            "train.tracking names tensorboard but the tensorboard package is missing: "
            "rerun scripts/setup.sh (or set train.tracking=none)"
        )
    if "mlflow" in names:
        if importlib.util.find_spec("mlflow") is None:
            raise TrackingError(
                "train.tracking names mlflow but MLflow is not installed: pip install -e "
                "'.[tracking]' (or drop mlflow from train.tracking)"
            )
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            raise TrackingError(
                "train.tracking names mlflow but MLFLOW_TRACKING_URI is not set: set it to "
                "the tracking server (http://host:5000) or a file store (file:///path, with "
                "MLFLOW_ALLOW_FILE_STORE=true)"
            )


class Tracker:
    """The run's trackers (``train.tracking``) behind one small interface; a no-op on ranks
    other than 0 and with ``train.tracking=none``."""

    def __init__(
        self,
        cfg: Config,
        is_main: bool,
        lr_factor: Callable[[int], float] | None = None,
        table_lr: bool = False,
    ) -> None:
        self.cfg, self.is_main = cfg, is_main
        self.names = tuple(dict.fromkeys(tracker_names(cfg.train.tracking)))
        check_available(self.names)
        self.lr_factor, self.table_lr = lr_factor, table_lr
        self.backends: dict[str, Backend] | None = None  # opened by start()
        self.last: tuple[int, float] = (0, 0.0)  # (step, perf_counter) of the last log

    def start(self, global_step: int) -> None:
        """Open the backends on rank 0 (once; later calls only reset the step clock). Events
        after ``global_step`` from an earlier, interrupted process are hidden in TensorBoard."""
        self.last = (global_step, time.perf_counter())
        if self.backends is not None:
            return
        self.backends = {}
        if not self.is_main:
            return
        purge = global_step + 1 if global_step > 0 else None
        for name in self.names:
            if name == "tensorboard":
                self.backends[name] = TensorBoardBackend(self.cfg.train.run_dir, purge)
            elif name == "mlflow":
                self.backends[name] = MlflowBackend(self.cfg, global_step)

    def learning_rates(self, step: int) -> dict[str, float]:
        """The rates of optimizer step ``step`` (the schedule's factor times the configured
        rate): ``lr/dense`` and, for a table with its own optimizer, ``lr/table``."""
        factor = self.lr_factor(step - 1) if self.lr_factor is not None else 1.0
        rates = {"lr/dense": self.cfg.train.lr * factor}
        if self.table_lr:
            rates["lr/table"] = self.cfg.embeddings.lr * factor
        return rates

    def log_step(self, step: int, losses: dict[str, float]) -> None:
        """A logged step: ``losses`` (the running means of the epoch) under ``step/``, the
        learning rates and the wall-clock seconds per step since the last log."""
        if not self.backends:
            return
        now = time.perf_counter()
        last_step, last_time = self.last
        values = {f"step/{k}": v for k, v in losses.items()}
        if step > last_step:
            values["step/seconds_per_step"] = (now - last_time) / (step - last_step)
        self.last = (step, now)
        self.write({**values, **self.learning_rates(step)}, step)

    def log_epoch(self, record: dict[str, Any], step: int) -> None:
        """An epoch record of metrics.json (:func:`epoch_scalars`), at the step that ended it;
        the backends flush (a remote TensorBoard folder is copied)."""
        if not self.backends:
            return
        self.write(epoch_scalars(record), step)
        self.each(lambda backend: backend.flush())
        self.last = (step, time.perf_counter())  # evaluation is not step time

    def write(self, values: dict[str, float], step: int) -> None:
        self.each(lambda backend: backend.scalars(values, step))

    def each(self, call: Callable[[Backend], None]) -> None:
        """``call`` on every backend; one that fails (a tracking server gone, a full disk) is
        dropped with a warning: training, and metrics.json, go on without it."""
        for name, backend in list((self.backends or {}).items()):
            try:
                call(backend)
            except Exception as e:  # any tool's failure: the run goes on
                del self.backends[name]
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning(f"train.tracking: {name} failed ({first}); training goes on "
                            "without it (metrics.json has every epoch record)")  # fmt: skip

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close every backend (``status``: FINISHED, FAILED or KILLED for MLflow)."""
        self.each(lambda backend: backend.close(status))
        self.backends = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.close("FINISHED")
        elif issubclass(kind, Interrupted | KeyboardInterrupt):  # a signal: resumable
            self.close("KILLED")
        else:
            self.close("FAILED")
