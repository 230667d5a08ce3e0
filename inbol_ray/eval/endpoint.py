"""Evaluate a model behind any OpenAI-compatible chat endpoint on the run's evaluation sets.

s_trust looks only at outputs, so any model can be scored: a served run of ours (`python -m serve`), a vLLM
or TGI server, a hosted API. Each item is sent exactly as the project's own models see it: the text is
`render_prompt(question, choices, cfg.prompt)` (LLaVA-1.5's instructions), the image a `data:` URL (none for
a text-only item), greedy, at most `eval.max_new_tokens`; `"render": false` tells our own endpoint the text
is already rendered (other servers ignore the field). Grading and refusal detection are the evaluate
stage's (`grade_predictions`, on the answer as `clean_response` leaves every engine's), so the rows are
comparable with every method of the run. (Our own endpoint tokenises chats with BOS, as every stage does:
`serve/llm_ingress.with_bos`.)

Endpoints fail: `concurrency` requests at most in flight, `timeout_s` per request, 429 / 5xx / timeouts /
dropped connections retried with exponential backoff (a `Retry-After` header wins), up to `max_attempts`.
Every answer is stored the moment it arrives (`endpoint_journal.Journal`: one small JSON file per item
under `<run>/eval/endpoint/<name>/<fingerprint>/`, the fingerprint of the endpoint, its model, the prompt
section and the decoding), so an interrupted or partly failed evaluation resumes asking only what has no
answer yet, and the same name pointed at another model, endpoint, prompt or decoding asks everything again
instead of passing off the old answers as its own. Items still failing after their attempts are listed
with the reason, written to the stage's quarantine, and asked again on the next run. The graded answers
go to `eval/predictions/<name>/` and the model into the run's registry (`eval.models`), so the run's
`predictions` and `metrics` hold it beside the run's methods, for the report and `jobs.compare`.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray import schema as S
from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.data.images import has_image, load_image_bytes
from inbol_ray.eval import models
from inbol_ray.eval.endpoint_journal import Journal, endpoint_key, request_digest
from inbol_ray.eval.evaluate import log_scores, run_methods, write_predictions
from inbol_ray.generation.grade import grade_predictions
from inbol_ray.model.generation import clean_response
from inbol_ray.model.prompt import chat_user_message, render_prompt
from inbol_ray.run_layout import RunLayout

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class EndpointSpec:
    """One model behind an OpenAI-compatible endpoint, and how hard to try it."""

    name: str
    """The model's name in the run's tables (e.g. `gpt-x`, `llava-13b-vllm`)."""
    base_url: str
    """Up to and including `/v1`, e.g. `http://127.0.0.1:8000/v1`."""
    model: str
    """The endpoint's `model` field."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the key (never the key itself: configs and logs stay clean)."""
    concurrency: int = 8
    timeout_s: float = 60.0
    max_attempts: int = 6
    backoff_s: float = 0.5
    """First retry's wait; doubled per attempt (with jitter), at most 30 s."""


class EndpointError(RuntimeError):
    """An item the endpoint did not answer after its attempts (or refused with a non-retryable status)."""


def request_settings(cfg: Config, model: str) -> dict[str, Any]:
    """Every field of a chat request but its messages: the same for every item, and part of the journal's
    key, so whatever is added here keys the journal too."""
    return {"model": model, "temperature": 0, "max_tokens": cfg.eval.max_new_tokens, "render": False}


def chat_body(row: dict[str, Any], cfg: Config, model: str) -> dict[str, Any]:
    """The chat request for one `items` row: rendered text, the image as a data URL when there is one, after
    `prompt.system` as a system message when the config has one (the line every method was sampled, trained
    and evaluated after; our ingress adds it only when a client sends none, so it is never doubled)."""
    text = render_prompt(row[S.QUESTION], row.get(S.CHOICES), cfg.prompt)
    system = [{"role": "system", "content": cfg.prompt.system}] if cfg.prompt.system else []
    return {
        "messages": [*system, chat_user_message(text, load_image_bytes(row) if has_image(row) else None)],
        **request_settings(cfg, model),
    }


async def _ask(client: Any, spec: EndpointSpec, body: dict[str, Any]) -> str:
    import httpx

    headers = {}
    key = os.environ.get(spec.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    last = ""
    for attempt in range(spec.max_attempts):
        wait = min(30.0, spec.backoff_s * 2**attempt) * (0.5 + random.random())
        try:
            r = await client.post(spec.base_url.rstrip("/") + "/chat/completions", json=body, headers=headers,
                                  timeout=spec.timeout_s)  # fmt: skip
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            last = f"{type(exc).__name__}"
        else:
            if r.status_code == 200:
                return str(r.json()["choices"][0]["message"]["content"] or "")
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            if r.status_code not in RETRY_STATUS:
                raise EndpointError(last)
            retry_after = r.headers.get("retry-after")
            if retry_after and retry_after.replace(".", "", 1).isdigit():
                wait = float(retry_after)
        if attempt + 1 < spec.max_attempts:
            await asyncio.sleep(wait)
    raise EndpointError(f"no answer after {spec.max_attempts} attempts (last: {last})")


@dataclass
class EndpointRun:
    asked: int = 0
    """Items sent this time (answered now or failed)."""
    reused: int = 0
    """Items answered by an earlier run (not asked again)."""
    failed: dict[str, str] = field(default_factory=dict)
    """Item id -> why it has no answer; asked again on the next run."""


async def ask_all(
    spec: EndpointSpec, bodies: dict[str, dict[str, Any]], journal: Journal
) -> tuple[EndpointRun, dict[str, str]]:
    """Ask every item without an answer in `journal`, `spec.concurrency` at a time; record as they arrive.
    Returns what happened and every answer (earlier runs' and this one's)."""
    import httpx

    requests = {i: request_digest(b) for i, b in bodies.items()}
    done = journal.answered(requests)
    todo = {i: b for i, b in bodies.items() if i not in done}
    run = EndpointRun(asked=len(todo), reused=len(bodies) - len(todo))
    limit = asyncio.Semaphore(spec.concurrency)

    async def one(client: httpx.AsyncClient, item_id: str, body: dict[str, Any]) -> None:
        async with limit:
            try:
                response = await _ask(client, spec, body)
            except EndpointError as exc:
                run.failed[item_id] = str(exc)
                return
            await asyncio.to_thread(journal.record, item_id, requests[item_id], response)
            done[item_id] = response

    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(one(client, i, b) for i, b in todo.items()))
    return run, done


def evaluate_endpoint(
    cfg: Config,
    layout: RunLayout,
    spec: EndpointSpec,
    selection_mask: Callable[[pa.Table], pa.Array],
    log: Callable[[str], None] = print,
) -> tuple[pd.DataFrame, EndpointRun]:
    """Ask, grade and register one endpoint model over the items `selection_mask` keeps; returns its graded
    predictions (answered items) and what happened."""
    models.claim(layout, spec.name, "endpoint")
    items = dio.read_table(layout.items)
    items = items.filter(selection_mask(items))
    if items.num_rows == 0:
        raise ValueError(f"no evaluation items in {layout.items}")
    rows = items.to_pylist()
    bodies = {row[S.ID]: chat_body(row, cfg, spec.model) for row in rows}
    key = endpoint_key(spec.base_url, request_settings(cfg, spec.model), cfg.prompt)
    journal = Journal(layout.path("eval", "endpoint", spec.name), key)
    run, answers = asyncio.run(ask_all(spec, bodies, journal))
    log(
        f"  {spec.name}: {run.asked} asked, {run.reused} answered before, {len(run.failed)} without an answer "
        f"(journal {journal.fingerprint})"
    )
    if others := journal.others():
        log(f"  {spec.name}: {len(others)} other journal(s) under this name (another endpoint, model, prompt "
            f"or decoding, or from before journals were keyed) left unread: {', '.join(others)}")  # fmt: skip
    quarantine = [
        {S.SOURCE: spec.base_url, S.ROW_KEY: i, S.REASON: why} for i, why in sorted(run.failed.items())
    ]
    dio.write_quarantine(quarantine, layout.root, f"evaluate_{spec.name}")
    answered = items.filter(pc.is_in(items[S.ID], pa.array(sorted(answers), pa.string())))
    frame = answered.drop_columns([S.IMAGE]).to_pandas()
    frame[S.RESPONSES] = [[clean_response(answers[i])] for i in frame[S.ID]]  # as every engine's answers
    frame[S.PROMPT] = [
        render_prompt(q, c, cfg.prompt) for q, c in zip(frame[S.QUESTION], frame[S.CHOICES], strict=True)
    ]
    graded = grade_predictions(frame, spec.name, cfg.grading.vqa_correct_at)
    table = S.conform(pa.Table.from_pandas(graded, preserve_index=False), S.PREDICTIONS, spec.name)
    dio.write_table(table, dio.join(layout.eval_shards(spec.name), "endpoint.parquet"))
    models.register(layout, models.ExternalModel(spec.name, "endpoint", spec.base_url, spec.model))
    log_scores(write_predictions(layout, run_methods(cfg, layout)), spec.name, log)
    return graded, run
