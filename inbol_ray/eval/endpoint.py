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
A key is sent only when `api_key_env` names its variable (none by default: a key meant for one service is
never handed to whatever URL was typed), and never in clear text to another machine: with a key, the URL
must be https, or http on a loopback address (`auth_headers`); anything else refuses to start.
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
import ipaddress
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

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
    api_key_env: str = ""
    """Environment variable holding the key (never the key itself: configs and logs stay clean); empty: no
    key is sent. Named explicitly, so no ambient key (`$OPENAI_API_KEY`) goes to an endpoint by default."""
    concurrency: int = 8
    timeout_s: float = 60.0
    max_attempts: int = 6
    backoff_s: float = 0.5
    """First retry's wait; doubled per attempt (with jitter), at most 30 s."""


class EndpointError(RuntimeError):
    """An item the endpoint did not answer after its attempts (or refused with a non-retryable status)."""


class UnsafeKey(ValueError):
    """A key that would travel where it should not (or a named key variable that is not set): the
    evaluation refuses to start rather than send it."""


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback IP literal. Other names are not resolved: what a name points to can change
    between this check and the request (DNS rebinding), a literal address cannot."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_headers(spec: EndpointSpec) -> dict[str, str]:
    """The `Authorization` header for `spec`'s key, or none when `spec.api_key_env` is empty. Raises
    `UnsafeKey` when the variable is unset or the key would go in clear text off this machine (plain http to
    a host that is not loopback): https carries it anywhere, http only to 127.0.0.0/8, ::1 or localhost."""
    if not spec.api_key_env:
        return {}
    key = os.environ.get(spec.api_key_env, "")
    if not key:
        raise UnsafeKey(f"${spec.api_key_env} is named as the endpoint's key but is not set")
    url = urlsplit(spec.base_url)
    scheme, host = url.scheme.lower(), url.hostname or ""
    if not (scheme == "https" or (scheme == "http" and is_loopback(host))):
        raise UnsafeKey(
            f"refusing to send ${spec.api_key_env} to {spec.base_url}: a key goes over https, or over plain "
            f"http to a loopback address only (use an https URL, or name no key variable if it needs none)"
        )
    return {"Authorization": f"Bearer {key}"}


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


async def _ask(client: Any, spec: EndpointSpec, body: dict[str, Any], headers: dict[str, str]) -> str:
    import httpx

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

    headers = auth_headers(spec)  # before anything is asked: an unsafe key stops the run, not each item
    requests = {i: request_digest(b) for i, b in bodies.items()}
    done = journal.answered(requests)
    todo = {i: b for i, b in bodies.items() if i not in done}
    run = EndpointRun(asked=len(todo), reused=len(bodies) - len(todo))
    limit = asyncio.Semaphore(spec.concurrency)

    async def one(client: httpx.AsyncClient, item_id: str, body: dict[str, Any]) -> None:
        async with limit:
            try:
                response = await _ask(client, spec, body, headers)
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
    predictions (answered items) and what happened. `UnsafeKey` (a ValueError) before anything is written."""
    auth_headers(spec)
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
