"""The comparison demo: one image + question answered by every served model side by side.

Each row is a model (`base` first, then the trained methods): its answer, whether it refused, and, when
asked, its confidence (the share of K sampled answers that agree with its answer). The point of InBoL is
visible in one glance: on an answerable question the trained models answer like the base; on a question
the picture cannot answer, the base guesses and the trained ones refuse.

Examples come from the run's own test sets (its `items` table: in-domain, out-of-domain and
unanswerable items with their gold answers), so what is shown is what was evaluated. Mounted on the
OpenAI ingress' FastAPI app (`serve/llm_ingress.py`), behind its guards (the key: a login cookie, see
`serve/auth.py`; the body size); every answer goes through the same `ask` as `POST /v1/answer`, with the
same input checks, the image checked off the event loop. Bounded like the API: uploads by `max_file_size`
(`serve.max_image_bytes`), waiting events by the queue's `max_size` (`serve.max_queued_requests`; more are
told the queue is full), each question by `serve.request_timeout_s`.
"""

from __future__ import annotations

import asyncio
import html
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import gradio as gr
import pyarrow.compute as pc
from fastapi import FastAPI

from inbol_ray import schema as S
from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.data.images import load_image_bytes
from inbol_ray.run_layout import RunLayout
from serve.api import ApiError, Limits, check_image, check_question

EXAMPLE_SPLITS = ("id_test", "ood_test", "unanswerable_test")
EXAMPLES_PER_SET = 2

CSS = """
.badge {display:inline-block; padding:6px 14px; border-radius:999px; font-weight:700; font-size:15px;
        letter-spacing:.04em}
.badge.refused {background:#fde68a; color:#78350f; border:2px solid #d97706}
.badge.answered {background:#bbf7d0; color:#14532d; border:2px solid #16a34a}
.badge.idle {background:#e5e7eb; color:#374151; border:2px solid #9ca3af}
.gradio-container img {image-rendering: pixelated}  /* ShapesWorld images are tiny: keep edges sharp */
#demo-image img {width: 100%; height: 100%; object-fit: contain}  /* and show them large */
"""
COMPARE_CSS = (
    CSS
    + """
table.compare {width:100%; border-collapse:collapse; font-size:15px}
table.compare th, table.compare td {padding:8px 10px; border-bottom:1px solid #e5e7eb; text-align:left}
table.compare td.answer {font-weight:600}
table.compare .bar {height:10px; width:120px; background:#e5e7eb; border-radius:5px; overflow:hidden}
table.compare .bar div {height:100%; background:#2563eb}
"""
)


THEME = gr.themes.Default(
    primary_hue="blue",
    font=["ui-sans-serif", "system-ui", "DejaVu Sans", "sans-serif"],
    font_mono=["ui-monospace", "DejaVu Sans Mono", "monospace"],
)
"""Local fonts only: the default theme fetches Google Fonts, which an offline or loopback-only machine
cannot reach (the page then renders in a fallback with odd glyph sizes)."""

T = TypeVar("T")


class Asker(Protocol):
    served: dict[str, Any]

    async def ask(
        self, image: bytes, question: str, mode: str = "answer", model: str | None = None
    ) -> dict[str, Any]: ...

    async def image_work(self, fn: Callable[..., T], *args: Any) -> T: ...


def badge_html(refused: bool | None) -> str:
    if refused is None:
        return '<span class="badge idle">NO ANSWER YET</span>'
    if refused:
        return '<span class="badge refused">REFUSED &mdash; the model says it cannot tell</span>'
    return '<span class="badge answered">ANSWERED</span>'


def demo_input(image_path: str | None, question: str | None, limits: Limits) -> tuple[bytes, str]:
    """The picked image and the question, through the same checks as `POST /v1/answer` (shown in the page)."""
    if not image_path:
        raise gr.Error("Upload an image or pick an example first.")
    try:
        return check_image(Path(image_path).read_bytes(), limits), check_question(question or "", limits)
    except ApiError as exc:
        raise gr.Error(exc.message) from None


@dataclass(frozen=True)
class Example:
    image_path: str
    question: str
    expected: str
    dataset: str


def run_examples(cfg: Config, out_dir: Path, per_set: int = EXAMPLES_PER_SET) -> list[Example]:
    """A few items of each of the run's test sets (first by id: the same ones every time), images as PNGs."""
    items_uri = RunLayout.of(cfg).items
    if not dio.exists(items_uri):
        return []
    items = dio.read_table(items_uri)
    chosen: list[Example] = []
    for split in EXAMPLE_SPLITS:
        rows = items.filter(pc.equal(items[S.SPLIT], split))
        for dataset in sorted(set(rows[S.DATASET].to_pylist())):
            subset = rows.filter(pc.equal(rows[S.DATASET], dataset)).sort_by(S.ID).slice(0, per_set)
            for row in subset.to_pylist():
                path = out_dir / f"{len(chosen):03d}.png"
                path.write_bytes(load_image_bytes(row))
                if row[S.ANSWERABLE]:
                    expected = "answer: " + (row[S.ANSWERS][0] if row[S.ANSWERS] else "?")
                else:
                    expected = "unanswerable: a trustworthy model refuses"
                chosen.append(Example(str(path), row[S.QUESTION], expected, dataset))
    return chosen


def comparison_html(results: list[dict[str, Any]], with_confidence: bool) -> str:
    """One row per model: name, answer, refusal badge, confidence (bar and share)."""
    head = (
        "<tr><th>model</th><th>answer</th><th>refused?</th>"
        + ("<th>confidence</th>" if with_confidence else "")
        + "</tr>"
    )
    rows = []
    for r in results:
        if "error" in r:
            cells = f'<td colspan="{3 if with_confidence else 2}">error: {html.escape(r["error"])}</td>'
        else:
            answer = html.escape(r["answer"] or "(empty answer)")
            cells = f'<td class="answer">{answer}</td><td>{badge_html(r["refused"])}</td>'
            if with_confidence:
                conf = float(r.get("confidence", 0.0))
                cells += (
                    f'<td><div class="bar"><div style="width:{conf * 100:.0f}%"></div></div>{conf:.0%}</td>'
                )
        rows.append(
            f'<tr data-model="{html.escape(r["model"])}"><td><code>{html.escape(r["model"])}</code></td>{cells}</tr>'
        )
    return f'<table class="compare" id="comparison-table">{head}{"".join(rows)}</table>'


def build_compare_demo(asker: Asker, limits: Limits, cfg: Config, examples_dir: Path) -> gr.Blocks:
    names = list(asker.served)
    k = cfg.serve.confidence_k

    async def ask_all(image_path: str | None, question: str, with_confidence: bool) -> tuple[str, str]:
        data, text = await asker.image_work(demo_input, image_path, question, limits)
        mode = "confidence" if with_confidence else "answer"
        start = time.perf_counter()

        async def one(name: str) -> dict[str, Any]:
            try:
                return await asyncio.wait_for(asker.ask(data, text, mode, name), cfg.serve.request_timeout_s)
            except TimeoutError:
                return {"model": name, "error": f"no answer within {cfg.serve.request_timeout_s:g} s"}
            except Exception as exc:  # one model failing must not hide the others' answers
                return {"model": name, "error": f"{type(exc).__name__}: {exc}"}

        results = await asyncio.gather(*(one(n) for n in names))
        latency = (time.perf_counter() - start) * 1000
        return comparison_html(list(results), with_confidence), f"{latency:.0f} ms for {len(names)} models"

    examples = run_examples(cfg, examples_dir)
    with gr.Blocks(title="inbol-ray: compare methods") as demo:
        gr.Markdown(
            "# Which model knows when to say *I don't know*?\n"
            "One image and question, answered by the base model and every trained method of this run. "
            "On an unanswerable question a trustworthy model refuses instead of guessing."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", format="png", label="Image", sources=["upload", "clipboard"],
                                 height=260, elem_id="demo-image")  # fmt: skip
                question = gr.Textbox(
                    label="Question", placeholder="What colour is the circle?", elem_id="question"
                )
                with_conf = gr.Checkbox(label=f"Estimate confidence ({k} sampled answers per model)", value=False,
                                        elem_id="with-confidence")  # fmt: skip
                ask_btn = gr.Button("Ask every model", variant="primary", elem_id="ask")
                expected = gr.Textbox(
                    label="Ground truth (examples only)", interactive=False, elem_id="expected"
                )
            with gr.Column(scale=2):
                table = gr.HTML(comparison_html([], False), elem_id="comparison")
                latency = gr.Textbox(label="Latency", interactive=False, elem_id="latency")
        if examples:
            gr.Examples(
                examples=[[e.image_path, e.question, e.expected] for e in examples],
                inputs=[image, question, expected],
                label="From this run's test sets (in-domain, out-of-domain, unanswerable)",
            )
        concurrency = cfg.serve.max_replicas * cfg.serve.max_ongoing_requests
        for trigger in (ask_btn.click, question.submit):
            trigger(ask_all, inputs=[image, question, with_conf], outputs=[table, latency],
                    concurrency_limit=concurrency, api_name=False)  # fmt: skip
    # Bounded: a full queue tells the next user so instead of holding events without end. api_open=False:
    # events run through the queue only (its bound and concurrency), never as direct REST calls.
    demo.queue(max_size=cfg.serve.max_queued_requests, api_open=False)
    return demo


def mount_compare_demo(app: FastAPI, asker: Asker, limits: Limits, cfg: Config, path: str) -> FastAPI:
    """Mount the comparison demo on `app` at `path` (no server-side rendering: it needs a Node server)."""
    examples_dir = Path(tempfile.mkdtemp(prefix="inbol-compare-"))
    return gr.mount_gradio_app(
        app,
        build_compare_demo(asker, limits, cfg, examples_dir),
        path=path,
        css=COMPARE_CSS,
        theme=THEME,
        pwa=False,
        root_path=path,  # under Serve the mounted app misses its prefix in file URLs (example images 404)
        allowed_paths=[str(examples_dir)],
        ssr_mode=False,
        footer_links=["api"],
        max_file_size=limits.max_image_bytes,  # uploads past it are refused while they stream in
        run_history=False,  # nothing of a user's session kept, or offered to send elsewhere
        mcp_server=False,  # the demo is a page, not a tool server for agents
    )
