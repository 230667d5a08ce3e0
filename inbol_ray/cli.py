"""One command line for every job: layered configs, a run dir, dotted overrides, checks before Ray starts.

    python -m jobs.<job> --config RECIPE.yaml [--config SITE.yaml ...] [--run-dir DIR_OR_URI] [--verbose]
                         [key=value ...]

Every job is the same program with a different stage selection: load the config (later files override
earlier ones, then the overrides), list every input problem at once (missing data files, unparseable
formats, stages whose inputs were never made or were made with another config) and exit 2 before Ray
starts, else run the selected stages through `inbol_ray.pipeline.run_pipeline`, with the same manifests as
the full pipeline. Ray is shut down only if the job started it. A job is the run directory's only driver
while it runs (`held`): a second job on the same run exits 2 naming the first. The console shows stage
lines, summaries, progress bars, warnings and errors; every line, and Ray's own output, is in the run's
`logs/` folder (`inbol_ray.console`); `--verbose` shows everything on the console too.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from inbol_ray.config import Config, ConfigError, load_config
from inbol_ray.pipeline import StageError, run_pipeline, select, stages, stale_inputs
from inbol_ray.run_layout import RunLayout

if TYPE_CHECKING:
    from inbol_ray.console import Console

Selection = tuple[list[str], str]
"""(only these stages, or all when empty; run up to and including this stage, or to the end when "")."""


def _fail(prog: str, head: str, lines: Sequence[str]) -> int:
    print(f"{prog}: {head}", file=sys.stderr)
    for line in lines:
        print(f"  - {line}", file=sys.stderr)
    return 2


def _input_problems(cfg: Config, layout: RunLayout, names: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Everything that would make the selected stages fail on their inputs, plus what was parsed meanwhile."""
    problems = stale_inputs(cfg, layout, select(stages(cfg), names))
    extras: dict[str, Any] = {}
    if "prepare" in names:
        from inbol_ray.data.loaders import DataFormatError
        from inbol_ray.data.mismatch import MismatchShortfall
        from inbol_ray.data.prepare import input_problems, read_sources, staging_root

        missing = input_problems(cfg.data)
        problems += missing
        if not missing:
            try:
                # formats fail while parsing: before Ray, too
                extras["prepare"] = read_sources(cfg, staging_root(layout))
            except DataFormatError as exc:
                problems.append(f"data format error: {exc}")
            except MismatchShortfall as exc:  # the training mix the config asks for cannot be built
                problems.append(str(exc))
    return problems, extras


def _parse(
    prog: str,
    doc: str,
    argv: Sequence[str] | None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    adjust: Callable[[Config, argparse.Namespace], None] | None = None,
) -> tuple[Config, argparse.Namespace] | int:
    """Every job's command line: `--config` (layered), `--run-dir`, the job's own arguments, then dotted
    overrides; returns the loaded config and the arguments, or exit code 2 after a config error."""
    parser = argparse.ArgumentParser(
        prog=f"python -m jobs.{prog}", description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument(
        "--config", action="append", required=True, help="YAML config; repeat to layer files (later wins)"
    )
    parser.add_argument("--run-dir", default="", help="override run_dir (local path or URI, e.g. s3://b/run)")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every line on the console: Ray's own INFO output and the rows under each summary "
        "(otherwise in the run's logs/ folder)",
    )
    if add_arguments:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (applied last)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.run_dir:
            cfg.run_dir = args.run_dir
        if adjust:
            adjust(cfg, args)
    except ConfigError as exc:
        return _fail(prog, f"config error: {exc}", [])
    return cfg, args


def run_job(
    prog: str,
    doc: str,
    argv: Sequence[str] | None,
    choose: Callable[[Config, argparse.Namespace], Selection],
    *,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    adjust: Callable[[Config, argparse.Namespace], None] | None = None,
) -> int:
    """Parse, load, check, run. `choose` picks the stages from the config and the parsed arguments;
    `adjust` may change the loaded config (e.g. a job-specific shorthand) before anything is checked."""
    loaded = _parse(prog, doc, argv, add_arguments, adjust)
    if isinstance(loaded, int):
        return loaded
    cfg, args = loaded
    try:
        only, until = choose(cfg, args)
        names = [s.name for s in select(stages(cfg), only, until)]
    except StageError as exc:
        return _fail(prog, str(exc), [])
    return held(prog, cfg, lambda: _run_stages(prog, cfg, RunLayout.of(cfg), names, args.verbose))


def _run_stages(prog: str, cfg: Config, layout: RunLayout, names: list[str], verbose: bool = False) -> int:
    """Check the selected stages' inputs (preparing stages its rows under the run), then run them, with
    the job's console (`inbol_ray.console`) and Ray's output in the run's `logs/`."""
    try:
        problems, extras = _input_problems(cfg, layout, names)
    except StageError as exc:
        return _fail(prog, str(exc), [])
    if problems:
        return _fail(prog, f"{len(problems)} input problem(s), nothing started:", problems)
    t0 = time.time()
    with job_session(prog, cfg, layout, verbose) as out:
        run_pipeline(cfg, layout, only=names, extras=extras, log=out.log)
        out.line(
            f"{prog}: {', '.join(names)} finished in {time.time() - t0:.0f}s; outputs under {layout.root}"
        )
    return 0


@contextlib.contextmanager
def job_session(prog: str, cfg: Config, layout: RunLayout, verbose: bool = False) -> Iterator[Console]:
    """A job's Ray session with its console (`inbol_ray.console`: stage lines, summaries, progress bars,
    warnings; every line to `logs/<prog>.log`) and Ray's own output in `logs/ray.log`
    (`runtime.ray_output_to`); `verbose` shows all of it on the console as well."""
    from inbol_ray import console
    from inbol_ray.runtime import ray_output_to, ray_session

    with (
        console.session(layout.root, prog, verbose=verbose) as out,
        ray_session(cfg.ray, cfg.checkpoint),
        ray_output_to(out.ray_log_path, verbose=verbose, tty=out.tty),
    ):
        yield out


def held(prog: str, cfg: Config, work: Callable[[], int]) -> int:
    """Run `work` as the run directory's only driver (`inbol_ray.run_lease`, renewed every third of
    `ray.driver_lease_s`); exit 2 naming the holder when another driver has the run. Taken before the
    input checks, which already write under the run (prepare stages its parsed rows there)."""
    from inbol_ray.run_lease import LeaseHeld, hold_lease

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(hold_lease(RunLayout.of(cfg).root, prog, cfg.ray.driver_lease_s))
        except LeaseHeld as exc:
            return _fail(prog, str(exc), [])
        return work()


def fixed(*names: str) -> Callable[[Config, argparse.Namespace], Selection]:
    """A job that always runs the same stages."""
    return lambda cfg, args: (list(names), "")


def model_job(
    prog: str, doc: str, argv: Sequence[str] | None, add_arguments: Callable[[argparse.ArgumentParser], None]
) -> tuple[Config, argparse.Namespace] | int:
    """The shared front of the jobs that score one more model on a run's sets (`jobs.evaluate_checkpoint`,
    `jobs.evaluate_endpoint`): every job's command line (`_parse`) plus the model's name and data sets, then
    the job's own arguments. Returns (config, arguments), or an exit code after a config error; the job
    then does its work under `held`, as the run's only driver."""

    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--name", required=True, help="the model's name in the run's tables")
        parser.add_argument(
            "--datasets", default="", help="comma-separated data sets (default: every evaluation set)"
        )
        add_arguments(parser)

    def datasets(cfg: Config, args: argparse.Namespace) -> None:
        args.datasets = [d for d in args.datasets.split(",") if d] or cfg.eval.datasets or None

    return _parse(prog, doc, argv, arguments, datasets)


def finish_model_job(cfg: Config, layout: RunLayout) -> None:
    """After another model joined the run's predictions: rewrite the report with it beside the methods."""
    from inbol_ray.eval.report import write_report

    print(f"report: {write_report(cfg, layout)}")
