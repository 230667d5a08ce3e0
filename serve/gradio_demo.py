"""The Gradio demo: pick or upload an image, ask, and see the answer, a refusal badge and the confidence.

Served from Ray Serve by mounting it on the ingress' FastAPI app (`mount_demo`), not by
`GradioServer` (broken with gradio 6, DESIGN.md section 7). The demo calls the same `ModelClient` as the
HTTP API and applies the same input checks, so what a user tries by hand is what clients get.

Preloaded examples are ShapesWorld test items (the run's seed, so they are the real `shapes_id_test` and
`shapes_unanswerable` items): answerable questions of each category next to questions the image proves
unanswerable, with the ground truth shown, so a refusal can be judged at a glance.
"""

from __future__ import annotations

import html
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI

from inbol_ray.config import Config
from inbol_ray.data.shapes import generate
from serve.api import ApiError, Limits, ModelClient, check_image, check_question

ANSWERABLE_CATEGORIES = ("easy_perception", "hard_perception", "knowledge")
UNANSWERABLE_EXAMPLES = 3
SCAN_ITEMS = 40
"""ShapesWorld items generated per split to find one example of each category (a few ms)."""

CSS = """
.badge {display:inline-block; padding:6px 14px; border-radius:999px; font-weight:700; font-size:15px;
        letter-spacing:.04em}
.badge.refused {background:#fde68a; color:#78350f; border:2px solid #d97706}
.badge.answered {background:#bbf7d0; color:#14532d; border:2px solid #16a34a}
.badge.idle {background:#e5e7eb; color:#374151; border:2px solid #9ca3af}
.conf {margin-top:4px}
.conf .track {height:14px; width:100%; background:#e5e7eb; border-radius:7px; overflow:hidden}
.conf .fill {height:100%; background:#2563eb}
.conf .note {font-size:13px; color:#4b5563; margin-top:4px}
.gradio-container img {image-rendering: pixelated}  /* ShapesWorld images are tiny: keep edges sharp */
#demo-image img {width: 100%; height: 100%; object-fit: contain}  /* and show them large */
"""

THEME = gr.themes.Default(
    primary_hue="blue",
    font=["ui-sans-serif", "system-ui", "DejaVu Sans", "sans-serif"],
    font_mono=["ui-monospace", "DejaVu Sans Mono", "monospace"],
)
"""Local fonts only: the default theme fetches Google Fonts, which an offline or loopback-only machine
cannot reach (the page then renders in a fallback with odd glyph sizes)."""


@dataclass(frozen=True)
class DemoExample:
    image_path: str
    question: str
    expected: str
    category: str


def demo_examples(cfg: Config, out_dir: Path) -> list[DemoExample]:
    """A few answerable items (one per category) and unanswerable ones, written as PNGs under `out_dir`."""
    shapes = replace(
        cfg.data.shapes,
        n_pretrain=0,
        n_train=0,
        n_val=0,
        n_id_test=SCAN_ITEMS,
        n_ood_test=0,
        n_unanswerable_test=UNANSWERABLE_EXAMPLES,
    )
    chosen, seen = [], set()
    for item in generate(shapes, cfg.model.image_size):
        answerable = item.answer is not None
        if answerable and item.category in seen:
            continue
        seen.add(item.category)
        path = out_dir / f"{item.id}.png"
        path.write_bytes(item.image)
        expected = f"answer: {item.answer}" if answerable else "unanswerable: the model should refuse"
        chosen.append(DemoExample(str(path), item.text, expected, item.category))
    order = {c: i for i, c in enumerate((*ANSWERABLE_CATEGORIES, "unanswerable"))}
    return sorted(chosen, key=lambda e: order.get(e.category, len(order)))


def badge_html(refused: bool | None) -> str:
    if refused is None:
        return '<span class="badge idle">NO ANSWER YET</span>'
    if refused:
        return '<span class="badge refused">REFUSED &mdash; the model says it cannot tell</span>'
    return '<span class="badge answered">ANSWERED</span>'


def confidence_html(result: dict[str, Any] | None) -> str:
    if not result or "confidence" not in result:
        return '<div class="conf"><div class="note">Tick "Estimate confidence" to sample answers.</div></div>'
    conf, samples = result["confidence"], result.get("samples", [])
    agree = round(conf * len(samples))
    shown = html.escape(", ".join(f'"{s}"' for s in samples[:10]))
    return (
        f'<div class="conf"><b>{conf:.0%}</b> confidence'
        f'<div class="track"><div class="fill" style="width:{conf * 100:.0f}%"></div></div>'
        f'<div class="note">{agree} of {len(samples)} sampled answers agree with the answer: {shown}</div></div>'
    )


def demo_input(image_path: str | None, question: str | None, limits: Limits) -> tuple[bytes, str]:
    """The picked image and the question, through the same checks as `POST /v1/answer` (shown in the page)."""
    if not image_path:
        raise gr.Error("Upload an image or pick an example first.")
    try:
        return check_image(Path(image_path).read_bytes(), limits), check_question(question or "", limits)
    except ApiError as exc:
        raise gr.Error(exc.message) from None


def build_demo(
    client: ModelClient, limits: Limits, cfg: Config, model_name: str, examples_dir: Path
) -> gr.Blocks:
    """The Blocks UI; `ask` goes through the same checks as `POST /v1/answer`."""
    k = cfg.serve.confidence_k

    async def ask(image_path: str | None, question: str, with_confidence: bool) -> tuple[str, str, str, str]:
        data, text = demo_input(image_path, question, limits)
        start = time.perf_counter()
        result = await client.answer(data, text, "confidence" if with_confidence else "answer")
        latency = (time.perf_counter() - start) * 1000
        shown = result["answer"] or "(empty answer: the model stopped at once)"
        return shown, badge_html(result["refused"]), confidence_html(result), f"{latency:.0f} ms"

    examples = demo_examples(cfg, examples_dir)
    with gr.Blocks(title="inbol-ray: refusal-aware VQA") as demo:
        gr.Markdown(
            "# Refusal-aware visual question answering\n"
            "Ask about the picture. A model trained with InBoL answers when the image holds the answer "
            "and says it does not know when it cannot tell. "
            f"Model: `{model_name}`."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    type="filepath",
                    format="png",
                    label="Image",
                    sources=["upload", "clipboard"],
                    height=260,
                    elem_id="demo-image",
                )
                question = gr.Textbox(
                    label="Question", placeholder="What colour is the circle?", elem_id="question"
                )
                with_conf = gr.Checkbox(label=f"Estimate confidence ({k} sampled answers)", value=True)
                ask_btn = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column(scale=1):
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                badge = gr.HTML(badge_html(None), elem_id="badge")
                confidence = gr.HTML(confidence_html(None), elem_id="confidence")
                latency = gr.Textbox(label="Latency", interactive=False, elem_id="latency")
                expected = gr.Textbox(label="Ground truth (examples only)", interactive=False)
        gr.Examples(
            examples=[[e.image_path, e.question, e.expected] for e in examples],
            inputs=[image, question, expected],
            label="ShapesWorld examples: answerable questions first, then questions the image cannot answer",
        )
        concurrency = cfg.serve.max_replicas * cfg.serve.max_ongoing_requests
        for trigger in (ask_btn.click, question.submit):
            trigger(
                ask,
                inputs=[image, question, with_conf],
                outputs=[answer, badge, confidence, latency],
                concurrency_limit=concurrency,  # gradio's default of 1 would serialise users
                api_name=False,
            )
    return demo


def mount_demo(
    app: FastAPI, client: ModelClient, limits: Limits, cfg: Config, model_name: str, path: str
) -> FastAPI:
    """Mount the demo on `app` at `path` (no server-side rendering: it needs a Node server)."""
    examples_dir = Path(tempfile.mkdtemp(prefix="inbol-demo-"))
    return mount(app, build_demo(client, limits, cfg, model_name, examples_dir), path, CSS, examples_dir)


def mount(app: FastAPI, demo: gr.Blocks, path: str, css: str, examples_dir: Path) -> FastAPI:
    """Mount a demo on `app` at `path` (no server-side rendering: it needs a Node server)."""
    return gr.mount_gradio_app(
        app,
        demo,
        path=path,
        css=css,
        theme=THEME,
        pwa=False,
        root_path=path,  # under Serve the mounted app misses its prefix in file URLs (example images 404)
        allowed_paths=[str(examples_dir)],
        ssr_mode=False,
        footer_links=["api"],
    )
