"""One pipeline run's tracking: the parent run, a child per stage and per training, evaluation, artifacts.

What goes where (both backends hold the same keys):
- parent (named `tracking.run_name`, else the run directory's name): parameters = the layered config
  flattened (`train.lr`, ...), `stage_hash.<stage>`, `version.<package>` (the manifests' versions),
  `git.commit` / `git.dirty` when the code is a git checkout; `tracking.tags` and `inbol.run_dir` as tags;
  at the end `eval/<method>/<set>/{acc,refr,s_trust,n}` from metrics.parquet, and report.md, figures/ and
  manifests/ as artifacts.
- a child per stage, also for stages skipped as up to date (`inbol.status` = ran / skipped), so the
  parent always describes the whole run: `stage.hash`, `seconds`, and the manifest's counts (numbers as
  metrics, text such as output URIs as parameters).
- a child per training (`inbol.kind` = method): the training's parameters, every step's metrics from the
  loop's rank 0 (`steps.py`), and its metrics.jsonl and train_result.json.

Off (`tracking.backend: none`, the default) everything here is a no-op; on, every call is guarded
(`guard.py`): the first failure warns once and tracking stops, the stages carry on.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from inbol_ray.data import io as dio
from inbol_ray.tracking.guard import Guard
from inbol_ray.tracking.params import as_text, flatten, git_commit, parse_tags, split_counts
from inbol_ray.tracking.steps import RunTarget

EVAL_COLUMNS = ("acc", "refr", "s_trust", "n")


def method_stage(method: str) -> str:
    """The pipeline's name for a method's training stage (pipeline.stages)."""
    return f"train_{method}"


class StageRun:
    """A running stage's child run: `done(counts)` records what the stage's manifest holds."""

    def __init__(self, tracking: Tracking, run: Any, name: str) -> None:
        self.tracking, self.run, self.name = tracking, run, name

    def done(self, counts: Mapping[str, Any]) -> None:
        self.tracking._counts(self.run, self.name, counts)


class Tracking:
    """The tracking of one `run_pipeline` call (`open_tracking`); `Tracking()` is tracking off."""

    def __init__(
        self,
        backend: Any = None,
        *,
        name: str = "",
        guard: Guard | None = None,
        tags: Mapping[str, str] | None = None,
        layout: Any = None,
    ) -> None:
        self.backend, self.name, self.layout = backend, name, layout
        self.guard = guard or Guard(uuid.uuid4().hex, "tracking off")
        self.tags = dict(tags or {})
        self.parent: Any = None
        self._stages: dict[str, Any] = {}
        self._methods: dict[str, Any] = {}

    @property
    def on(self) -> bool:
        return self.backend is not None and self.parent is not None and self.guard.on

    def _call(self, doing: str, op: str, run: Any, *args: Any) -> Any:
        """`backend.<op>(run, *args)`, guarded; nothing when tracking is off or `run` never opened."""
        if not self.on or run is None:
            return None
        return self.guard(doing, getattr(self.backend, op), run, *args)

    def start_parent(self, params: Mapping[str, Any]) -> str:
        """Open the parent run; returns a line for the console saying where it is ("" when off)."""
        if self.backend is None or not self.guard.on:
            return ""
        start = self.backend.start
        self.parent = self.guard(
            "starting the pipeline's run", start, self.name, "pipeline", None, self.tags, params
        )
        if self.parent is None:
            return ""
        link = self.guard("linking the pipeline's run", self.backend.link, self.parent)
        return f"tracking: {self.backend.name} run {self.name!r} -> {link}"

    def _child(self, name: str, kind: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> Any:
        if not self.on:
            return None
        tags = {**self.tags, **tags}
        return self.guard(
            f"starting the {name} run", self.backend.start, name, kind, self.parent, tags, params
        )

    # --- stages --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def stage(self, name: str, config_hash: str) -> Iterator[StageRun]:
        """A stage that runs: its child is open while it runs, FAILED if it raises (then re-raised)."""
        run = self._child(
            name, "stage", {"inbol.stage": name, "inbol.status": "ran"}, {"stage.hash": config_hash}
        )
        self._stages[name] = run
        t0, ok = time.time(), False
        try:
            yield StageRun(self, run, name)
            ok = True
        finally:
            self._call(f"logging stage {name}", "log_metrics", run, {"seconds": time.time() - t0})
            self._call(f"ending stage {name}", "finish", run, ok)

    def skipped(self, name: str, config_hash: str, counts: Mapping[str, Any]) -> None:
        """A stage found up to date: a child all the same, with the counts of the output it reused."""
        run = self._child(
            name, "stage", {"inbol.stage": name, "inbol.status": "skipped"}, {"stage.hash": config_hash}
        )
        self._counts(run, name, counts)
        self._call(f"ending stage {name}", "finish", run, True)

    def _counts(self, run: Any, name: str, counts: Mapping[str, Any]) -> None:
        metrics, params = split_counts(counts, "counts")
        self._call(f"logging stage {name}", "log_metrics", run, metrics)
        self._call(f"logging stage {name}", "log_params", run, params)

    # --- trainings -----------------------------------------------------------------------------------

    def start_method(self, method: str, params: Mapping[str, Any]) -> RunTarget | None:
        """The training's child run, for the loop's rank 0 to log steps into; None when tracking is off."""
        if not self.on:
            return None
        tags = {**self.tags, "inbol.method": method}
        prepare = self.backend.prepare_method
        made = self.guard(f"starting the {method} training's run", prepare, method, self.parent, tags, params)
        if made is None:
            return None
        handle, run_id, group = made
        self._methods[method] = handle
        return RunTarget(
            backend=self.backend.name,
            uri=self.backend.uri,
            project=self.backend.project,
            run_id=run_id,
            name=method,
            session=self.guard.session,
            group=group,
            tags=tuple(f"{k}={v}" for k, v in tags.items()),
            params=tuple(as_text(params).items()),
        )

    def end_method(self, method: str, files: Mapping[str, str], ok: bool = True) -> None:
        """The training's files (artifact path -> location) onto its run, and the run ended. W&B's
        training run belongs to rank 0 (wandb_backend), so there they go onto the training stage's run."""
        handle = self._methods.pop(method, None)
        run = handle if handle is not None else self._stages.get(method_stage(method))
        self._files(run, files, f"the {method} training's files")
        self._call(f"ending the {method} training's run", "finish", handle, ok)

    # --- the end -------------------------------------------------------------------------------------

    def close(self, finished: Mapping[str, Any], ok: bool) -> None:
        """Evaluation metrics and the run's files onto the parent, then end it (and any training run a
        failure left open). `finished`: the stages done or up to date in this call, by name."""
        if self.on:
            self.guard("ending the pipeline's run", self._close, finished, ok)

    def _close(self, finished: Mapping[str, Any], ok: bool) -> None:
        layout = self.layout
        if "evaluate" in finished and dio.exists(layout.metrics):
            self.backend.log_metrics(self.parent, eval_metrics(layout.metrics))
        files = {f"manifests/{name}.json": layout.manifest(name) for name in finished}
        if "report" in finished:
            files["report.md"] = layout.report
            figures = layout.path("figures")
            if dio.exists(figures):
                files.update(
                    {f"figures/{uri.rsplit('/', 1)[-1]}": uri for uri in dio.list_files(figures, ".png")}
                )
        self._upload(self.parent, {k: v for k, v in files.items() if dio.exists(v)})
        for handle in self._methods.values():
            if handle is not None:
                self.backend.finish(handle, False)
        self.backend.finish(self.parent, ok)

    def _files(self, run: Any, files: Mapping[str, str], what: str) -> None:
        if self.on and run is not None and files:
            self.guard(f"uploading {what}", self._upload, run, files)

    def _upload(self, run: Any, files: Mapping[str, str]) -> None:
        with tempfile.TemporaryDirectory(prefix="inbol_tracking_") as tmp:
            self.backend.log_files(run, {path: _local_copy(uri, path, tmp) for path, uri in files.items()})


def _local_copy(uri: str, path: str, tmp: str) -> str:
    """A local file for `uri` named like the artifact path's last part (trackers upload local files)."""
    if not dio.is_uri(uri) and os.path.basename(uri) == os.path.basename(path):
        return uri
    out = os.path.join(tmp, path)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "wb") as f:
        f.write(dio.read_bytes(uri))
    return out


def eval_metrics(metrics_uri: str) -> dict[str, float]:
    """metrics.parquet as `eval/<method>/<set>/<acc|refr|s_trust|n>`: one value per cell, so a sweep's
    parent runs compare on any method and set."""
    out = {}
    for row in dio.read_table(metrics_uri).to_pylist():
        for column in EVAL_COLUMNS:
            if row.get(column) is not None:
                out[f"eval/{row['method']}/{row['dataset']}/{column}"] = float(row[column])
    return out


def run_params(cfg: Any, hashes: Mapping[str, str]) -> dict[str, Any]:
    """The parent's parameters: config, stage hashes, versions, commit."""
    from inbol_ray.manifest import _versions

    return {
        **flatten(cfg),
        **{f"stage_hash.{name}": h for name, h in hashes.items()},
        **{f"version.{name}": v for name, v in _versions().items()},
        **git_commit(),
    }


def open_tracking(
    cfg: Any, layout: Any, hashes: Mapping[str, str], log: Callable[[str], None] = print
) -> Tracking:
    """The tracking `cfg.tracking` asks for, with its parent run started (or off, after one warning, when
    the tracker cannot be reached or its client is not installed: `pip install 'inbol-ray[tracking]'`)."""
    tc = cfg.tracking
    if tc.backend == "none":
        return Tracking()
    guard = Guard(uuid.uuid4().hex, f"{tc.backend} at {tc.uri or 'its default location'}")
    backend = guard("connecting (installed? pip install 'inbol-ray[tracking]')", _backend, tc)
    tags = {**parse_tags(tc.tags), "inbol.run_dir": layout.root}
    name = tc.run_name or layout.root.rstrip("/").rsplit("/", 1)[-1]
    tracking = Tracking(backend, name=name, guard=guard, tags=tags, layout=layout)
    line = tracking.start_parent(guard("collecting the run's parameters", run_params, cfg, hashes) or {})
    if line:
        log(line)
    return tracking


def _backend(tc: Any) -> Any:
    if tc.backend == "mlflow":
        from inbol_ray.tracking.mlflow_backend import MlflowBackend

        return MlflowBackend(tc)
    from inbol_ray.tracking.wandb_backend import WandbBackend

    return WandbBackend(tc)
