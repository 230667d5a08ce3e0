"""The comparison demo: one image + question answered by every served model side by side.

Each row is a model (`base` first, then the trained methods): its answer, whether it refused, and, when
asked, its confidence (the share of K sampled answers that agree with its answer). The point of InBoL is
visible in one glance: on an answerable question the trained models answer like the base; on a question
the picture cannot answer, the base guesses and the trained ones refuse.

Examples come from the run's own test sets (its `items` table: in-domain, out-of-domain and
unanswerable items with their gold answers), so what is shown is what was evaluated. Mounted on the
OpenAI ingress' FastAPI app (`serve/llm_ingress.py`); every answer goes through the same `ask` as
`POST /v1/answer`, with the same input checks.
"""

from __future__ import annotations

import asyncio
import html
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gradio as gr
import pyarrow.compute as pc
from fastapi import FastAPI

from inbol_ray import schema as S
from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.data.images import load_image_bytes
from inbol_ray.run_layout import RunLayout
from serve.api import Limits
from serve.gradio_demo import CSS, badge_html, demo_input, mount

EXAMPLE_SPLITS = ("id_test", "ood_test", "unanswerable_test")
EXAMPLES_PER_SET = 2

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


class Asker(Protocol):
    served: dict[str, Any]

    async def ask(
        self, image: bytes, question: str, mode: str = "answer", model: str | None = None
    ) -> dict[str, Any]: ...


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
        data, text = demo_input(image_path, question, limits)
        mode = "confidence" if with_confidence else "answer"
        start = time.perf_counter()

        async def one(name: str) -> dict[str, Any]:
            try:
                return await asker.ask(data, text, mode, name)
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
    return demo


def mount_compare_demo(app: FastAPI, asker: Asker, limits: Limits, cfg: Config, path: str) -> FastAPI:
    """Mount the comparison demo on `app` at `path` (as `serve/gradio_demo.mount_demo` does)."""
    examples_dir = Path(tempfile.mkdtemp(prefix="inbol-compare-"))
    return mount(app, build_compare_demo(asker, limits, cfg, examples_dir), path, COMPARE_CSS, examples_dir)
