"""MLflow through its client (`MlflowClient`), never the fluent `mlflow.start_run` API.

Why the client: the fluent API keeps one "active run" per thread of the process, while the pipeline runs
stages in threads (`ray.concurrent_stages`) and local-mode training runs the loop inside the driver; every
call here names its run id, so concurrent stages and the loop cannot log into each other's runs. For the
same reason the Ray Train workers do not use `ray.air.integrations.mlflow.setup_mlflow` (Ray 2.60): it
always *starts* a run (the fluent way, with run name and tags, no run id to attach to), while the method's
run must be the child the driver made under the pipeline's parent run, and the worker only logs steps into
it (`MlflowSink`).

A dead server must fail fast: MLflow's own default is 7 retries with exponential backoff (about four minutes
per call, measured against a closed port); the client here defaults to 2 retries and a 30 s timeout (the
`MLFLOW_HTTP_REQUEST_*` variables still win when set), then `Guard` turns tracking off.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from inbol_ray.config.sections import TrackingConfig
from inbol_ray.tracking.params import as_text

CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # The client prints "View run ... at: <url>" for every run it ends; the pipeline prints the parent's once.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
MAX_PARAM_CHARS = 6000
"""MLflow's limit on a parameter value."""


def client(uri: str):
    """An `MlflowClient` for `uri` ("" = $MLFLOW_TRACKING_URI or MLflow's default), failing fast."""
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri or None)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def log_metrics(mlflow_client, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """One request per 1000 values (MLflow's batch limit), all stamped now at `step`."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    items = [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
    for chunk in _chunks(items, 1000):
        mlflow_client.log_batch(run_id, metrics=list(chunk))


class MlflowBackend:
    """The driver's side: runs are MLflow run ids; a child is a run tagged `mlflow.parentRunId`."""

    name = "mlflow"

    def __init__(self, tracking: TrackingConfig) -> None:
        self.client = client(tracking.uri)
        self.uri = str(self.client.tracking_uri)
        """Resolved here ($MLFLOW_TRACKING_URI when `tracking.uri` is empty): Ray Train workers get it as is."""
        self.project = tracking.project
        self.experiment_id = self._experiment(tracking.project)

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # made meanwhile by another driver
            return self.client.get_experiment_by_name(name).experiment_id

    def start(
        self, name: str, kind: str, parent: str | None, tags: Mapping[str, str], params: Mapping[str, Any]
    ) -> str:
        tags = {**tags, "inbol.kind": kind, **({"mlflow.parentRunId": parent} if parent else {})}
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=dict(tags)).info.run_id
        self.log_params(run_id, params)
        return run_id

    def prepare_method(
        self, name: str, parent: str, tags: Mapping[str, str], params: Mapping[str, Any]
    ) -> tuple[str, str, str]:
        """(driver handle, run id, group) of a training's run: made here, a child of `parent`; the loop's
        rank 0 logs its steps into it by id, the driver ends it."""
        run_id = self.start(name, "method", parent, tags, params)
        return run_id, run_id, ""

    def log_params(self, run: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in as_text(params).items()]
        for chunk in _chunks(items, 100):  # MLflow's batch limit for parameters
            self.client.log_batch(run, params=list(chunk))

    def log_metrics(self, run: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        log_metrics(self.client, run, metrics, step or 0)

    def log_files(self, run: str, files: Mapping[str, str]) -> None:
        """`files`: artifact path -> local file whose name is the path's last part."""
        for path, local in files.items():
            self.client.log_artifact(run, local, posixpath.dirname(path) or None)

    def finish(self, run: str, ok: bool) -> None:
        self.client.set_terminated(run, "FINISHED" if ok else "FAILED")

    def link(self, run: str) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run}"
        return f"{self.uri} (experiment {self.experiment_id}, run {run})"


class MlflowSink:
    """A training worker's side (rank 0): steps into the run the driver made, by its id."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = client(uri)
        self.run_id = run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        log_metrics(self.client, self.run_id, metrics, step)

    def close(self, ok: bool) -> None:
        """Nothing: the driver ends the run after exporting the model (its files go with it)."""
