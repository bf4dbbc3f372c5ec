# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""MLflow wiring: an embedded SQLite store by default, parent and nested runs, MONAI's ``MLFlowHandler`` on them.

MONAI's :class:`~monai.handlers.MLFlowHandler` logs an engine's metrics to the run of a given name. We create the
runs ourselves (with ``mlflow.parentRunId`` tags for nesting) and hand their names to the handler, so each round
and phase of an ICMIL experiment is a nested run of one parent run.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MLflowRun",
    "MLflowRunTree",
    "sqlite_tracking_uri",
    "start_run",
    "end_run",
    "mlflow_handler",
    "using_store",
]

_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def sqlite_tracking_uri(output_dir: str | os.PathLike) -> str:
    """``sqlite:///<output_dir>/mlruns.db`` (absolute), the default store (MLflow 3.17 refuses the file store)."""
    path = Path(output_dir).resolve() / "mlruns.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


#: settings that change how fast a run goes, not its results (a resumed run may differ in them)
_RUNTIME_SETTINGS = {
    "progress", "num_workers", "read_threads", "prefetch_threads", "device", "copy_stream", "compile", "workers",
}  # fmt: skip


def _runtime(key: str) -> bool:
    return key.replace("#", ".").rsplit(".", 1)[-1] in _RUNTIME_SETTINGS


@dataclass
class MLflowRun:
    """An MLflow run we created: where it lives and how MONAI's handler finds it (by ``run_name``)."""

    tracking_uri: str
    experiment_name: str
    run_name: str
    run_id: str
    artifact_location: str | None = None

    def client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log ``params``; those the run already has are kept (MLflow cannot change a param). When a resumed run is
        given another value (an interrupted phase rerun with other settings), the new value goes to the tag
        ``changed_param.<key>`` and a warning names the keys, so the run does not show the first attempt's
        settings as those of its results; settings that do not change results (progress bars, workers, threads,
        device) are left alone."""
        import mlflow

        items = [mlflow.entities.Param(str(k)[:250], str(v)[:6000]) for k, v in _flatten(params).items()]
        existing = self.client().get_run(self.run_id).data.params
        changed = [p for p in items if p.key in existing and existing[p.key] != p.value and not _runtime(p.key)]
        items = [p for p in items if p.key not in existing]
        for i in range(0, len(items), 100):
            self.client().log_batch(self.run_id, params=items[i : i + 100])
        if changed:
            tags = [mlflow.entities.RunTag(f"changed_param.{p.key}"[:250], p.value) for p in changed]
            self.client().log_batch(self.run_id, tags=tags)
            warnings.warn(
                f"MLflow run '{self.run_name}' was resumed with other values of {', '.join(p.key for p in changed)}; "
                "MLflow keeps a run's first params, so the new values are in its 'changed_param.<key>' tags.",
                stacklevel=2,
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import math

        for k, v in metrics.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                self.client().log_metric(self.run_id, k, float(v), step=step or 0)

    def log_artifacts(self, paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> None:
        for p in paths:
            if Path(p).exists():
                if Path(p).is_dir():
                    self.client().log_artifacts(self.run_id, str(p), artifact_path)
                else:
                    self.client().log_artifact(self.run_id, str(p), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client().set_tag(self.run_id, key, value)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def start_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    parent: MLflowRun | None = None,
    tags: Mapping[str, str] | None = None,
) -> MLflowRun:
    """Create the run ``run_name`` (nested under ``parent`` if given), or resume an unfinished one of that name.

    Resuming keeps a rerun after an interruption in the same run instead of starting a new one (a run that ended
    FAILED or KILLED is set RUNNING again).
    """
    import mlflow
    from mlflow.entities import RunStatus

    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        artifact_location = Path(tracking_uri[len("sqlite:///") :]).parent.joinpath("mlruns").resolve().as_uri()
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    exp_id = (
        exp.experiment_id if exp else client.create_experiment(experiment_name, artifact_location=artifact_location)
    )
    all_tags = dict(tags or {})
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent.run_id
    quoted = f'"{run_name}"' if "'" in run_name else f"'{run_name}'"  # MLflow's filter takes either quote
    for run in client.search_runs([exp_id], filter_string=f"attributes.run_name = {quoted}"):
        same_parent = run.data.tags.get("mlflow.parentRunId") == (parent.run_id if parent else None)
        if same_parent and run.info.status != RunStatus.to_string(RunStatus.FINISHED):
            if run.info.status != RunStatus.to_string(RunStatus.RUNNING):  # a failed or killed attempt, resumed
                client.update_run(run.info.run_id, status="RUNNING")
            return MLflowRun(tracking_uri, experiment_name, run_name, run.info.run_id, artifact_location)
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    return MLflowRun(tracking_uri, experiment_name, run_name, run.info.run_id, artifact_location)


@contextmanager
def _environment_without(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextmanager
def using_store(uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URIs set to ``uri`` for the fluent API (``mlflow.start_run``,
    ``mlflow.pyfunc.log_model``), then put back as they were, environment variables included (MLflow's setters
    export them, which would send every later MLflow client of the process, MONAI's handler among them, to
    ``uri``)."""
    import mlflow

    before = {name: os.environ.get(name) for name in _URI_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])  # None: unset, as it was
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def end_run(run: MLflowRun, status: str = "FINISHED") -> None:
    run.client().set_terminated(run.run_id, status=status)


def mlflow_handler(run: MLflowRun, **kwargs: Any) -> Any:
    """MONAI's ``MLFlowHandler`` logging into ``run`` (found by its name; a unique name per run is ours to keep)."""
    from monai.handlers import MLFlowHandler

    # MONAI's handler prefers $MLFLOW_TRACKING_URI to its argument (and ``mlflow.set_tracking_uri`` sets that
    # variable): built without it, the handler's client is on the store our runs are in
    with _environment_without("MLFLOW_TRACKING_URI"):
        handler = MLFlowHandler(
            tracking_uri=run.tracking_uri,
            experiment_name=run.experiment_name,
            run_name=run.run_name,
            artifact_location=run.artifact_location,
            close_on_complete=False,
            **kwargs,
        )
    handler.cur_run = run.client().get_run(run.run_id)  # exactly our run, even if another has the same name
    return handler


class MLflowRunTree:
    """An ICMIL experiment's runs: one parent run, a nested run per round and one per phase of a round
    (``round_<r>/<phase>``), or per step before the rounds (``pretrain``). Only rank 0 logs; elsewhere, or when
    disabled, every run is ``None``.

    Args:
        output_dir: the default store is ``sqlite:///<output_dir>/mlruns.db``.
        enabled: log at all.
        tracking_uri: another tracking store.
        experiment_name, run_name: the experiment and the parent run's name.
        params: the parent run's parameters (or a function giving them), logged when it is created.
        registered_model_name: the name under which the final model is registered in the store's model registry
            (:mod:`monai_icmil.serving`); ``None``: not logged as an MLflow model.
        parent_run_id: nest this tree's parent run under that run of the same store (a cross-validation fold's
            run under the cross-validation's run).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        enabled: bool = True,
        tracking_uri: str | None = None,
        experiment_name: str = "icmil",
        run_name: str = "icmil",
        params: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        registered_model_name: str | None = "icmil",
        parent_run_id: str | None = None,
    ):
        from monai_icmil.utils import as_bool

        self.output_dir, self.enabled, self.tracking_uri = (
            Path(output_dir),
            as_bool(enabled, "mlflow#enabled"),
            tracking_uri,
        )
        self.experiment_name, self.run_name, self.params = experiment_name, run_name, params
        self.registered_model_name = registered_model_name or None
        self.parent_run_id = parent_run_id or None
        self._parent: MLflowRun | None = None
        self._open: dict[str, MLflowRun] = {}  # started and not ended, by run id, in start order

    def parent(self) -> MLflowRun | None:
        """The parent run (created, or resumed when unfinished, on first use)."""
        from monai_icmil.utils import dist_info

        if not self.enabled or dist_info()[0] != 0:
            return None
        if self._parent is None:
            uri = self.tracking_uri or sqlite_tracking_uri(self.output_dir)
            above = None
            if self.parent_run_id is not None:
                above = MLflowRun(uri, self.experiment_name, "", self.parent_run_id)
            self._parent = start_run(uri, self.experiment_name, self.run_name, parent=above)
            self._open[self._parent.run_id] = self._parent
            params = self.params() if callable(self.params) else self.params
            if params:
                self._parent.log_params(params)
        return self._parent

    def nested(self, name: str, parent: MLflowRun | None = None) -> MLflowRun | None:
        """A run nested under ``parent`` (default: the parent run)."""
        top = self.parent()
        if top is None:
            return None
        run = start_run(top.tracking_uri, top.experiment_name, name, parent=parent or top)
        self._open[run.run_id] = run
        return run

    def round(self, r: int) -> MLflowRun | None:
        return self.nested(f"round_{r}")

    def phase(self, r: int, phase: str) -> MLflowRun | None:
        rr = self.round(r)
        return None if rr is None else self.nested(f"round_{r}/{phase}", parent=rr)

    def end(self, run: MLflowRun | None) -> None:
        """End ``run`` as FINISHED."""
        if run is not None:
            end_run(run)
            self._open.pop(run.run_id, None)

    def close(self) -> None:
        """End the parent run (a later use starts or resumes one again)."""
        self.end(self._parent)
        self._parent = None

    def abandon(self, status: str = "FAILED") -> None:
        """End every run still open (the phase, its round, the parent: innermost first) with ``status`` (``"FAILED"``
        or ``"KILLED"``), so that none is left RUNNING after an error; a rerun resumes them. A store that cannot be
        reached is warned about, not raised: the error that got here matters more."""
        for run in reversed(list(self._open.values())):
            try:
                end_run(run, status)
            except Exception as e:
                warnings.warn(f"MLflow run '{run.run_name}' could not be marked {status} ({type(e).__name__}: {e})")
        self._open.clear()
        self._parent = None
