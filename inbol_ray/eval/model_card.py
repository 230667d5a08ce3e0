"""The model card (`README.md`) of an exported method: what it is, how it was trained, how it scored.

Why a card at all: an adapter copied out of a run says nothing about itself, and a refusing model read
without its numbers is easy to misjudge (its accuracy drops by design; s_trust is what it trades for). So
the card carries the run's own tables, drawn by the report's code (`report.split_table`, the same
`SECTIONS`), the report's recipe section (`recipe.recipe_section`) for the method and the method it
started from, and the prompt format the scores were measured under, since another prompt is another model
behaviour. The Hub reads the YAML front matter (base model, license, data sets, library, pipeline tag).

`render_card` is pure (tested without a run); `card_for` reads the run's metrics and item keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import yaml

from inbol_ray import methods as M
from inbol_ray import schema as S
from inbol_ray.data import io as dio
from inbol_ray.eval.recipe import recipe_section
from inbol_ray.eval.report import (
    dataset_splits,
    method_order,
    read_item_keys,
    sets_line,
    split_sections,
    split_table,
)
from inbol_ray.model.prompt import format_prompt, render_prompt
from inbol_ray.refusal import REFUSAL_TEMPLATES

PIPELINE_TAG = "image-text-to-text"
IMAGE_PLACEHOLDER = "your_image.jpg"
"""The image path the loading snippet opens: a test substitutes a real file for it."""
ADAPTER_PLACEHOLDER = "."
"""Where the snippet loads the export from: this folder (or the Hub repo it was uploaded to)."""

TITLES = {
    "sft": "SFT baseline",
    "idk_it": "IDK-IT",
    "dpo1": "DPO(1) ablation",
    "dpo2": "DPO(2) ablation",
    "dpo3": "DPO(3) ablation",
    "cadpo": "CA-DPO",
}


@dataclass(frozen=True)
class Exported:
    """What the export wrote and where it came from: what the card says beyond the config and tables."""

    method: str
    adapter: bool
    """A peft adapter on the base (library peft), else a full model (library transformers)."""
    base_id: str | None
    """The public Hub id the export names as its base (`org/name` or `org/name@revision`), or None."""
    base_location: str
    """Where the run's base model is (kept as the base when there is no Hub id)."""
    license: str
    datasets: tuple[str, ...]
    """The training data sets (Hub ids where the config names them so)."""
    run_dir: str
    provenance: Mapping[str, str] = field(default_factory=dict)
    """Label -> value lines of the provenance section (manifest tokens, export folder, versions)."""

    @property
    def base_repo(self) -> str | None:
        return self.base_id.split("@", 1)[0] if self.base_id else None

    @property
    def base_revision(self) -> str | None:
        return self.base_id.split("@", 1)[1] if self.base_id and "@" in self.base_id else None


def front_matter(e: Exported) -> str:
    """The YAML block the Hub reads; `base_model` only when it is a Hub id (a path there is invalid)."""
    library = "peft" if e.adapter else "transformers"
    tags = ["inbol", "refusal", "trustworthiness", e.method, "lora" if e.adapter else "full-fine-tune"]
    if e.base_repo and e.adapter:  # what the Hub lists an adapter under its base by
        tags.append(f"base_model:adapter:{e.base_repo}")
    meta: dict = {"license": e.license}
    if e.base_repo:
        meta["base_model"] = e.base_repo
    meta.update(
        datasets=list(e.datasets), library_name=library, pipeline_tag=PIPELINE_TAG, tags=tags
    )  # fmt: skip
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def method_paragraph(method: str, cfg) -> str:
    """One paragraph on what the method is, with this run's thresholds filled in."""
    c = cfg.construct
    # construct.refusal_template -1 rotates over the templates by item id: the first stands for them all
    refusal = f'"{REFUSAL_TEMPLATES[max(c.refusal_template, 0)]}"'
    refusal += " or another refusal template" if c.refusal_template < 0 else ""
    confidence = (
        f"InBoL (Information Boundary-aware Learning) teaches a multimodal model to refuse outside its "
        f"information boundary. The base model answers each training question K={cfg.sampling.k} times "
        f"(temperature {cfg.sampling.temperature:g}, top-p {cfg.sampling.top_p:g}); its confidence is the "
        f"share of those answers that are right (0 for a question the image cannot answer)."
    )
    if method in ("idk_it", "sft"):
        when = (
            f"the question is unanswerable or the confidence is below tau_idk = {c.tau_idk:g}"
            if method == "idk_it"
            else "the question is unanswerable (the SFT baseline: it never learns the model's own limits)"
        )
        return (
            f"{confidence} {TITLES[method]} is supervised fine-tuning on those questions: the target is a "
            f"refusal ({refusal}) when {when}, otherwise the gold answer; the loss is the cross-entropy "
            "of the response tokens."
        )
    mixed = {
        "cadpo": "both, weighted by conf and 1 − conf",
        "dpo1": "only refusal ≻ incorrect",
        "dpo2": "only correct ≻ incorrect",
        "dpo3": "both, weight ½ each",
    }[method]
    return (
        f"{confidence} {TITLES[method]} is InBoL's second step: DPO on preference pairs chosen by that "
        f"confidence. Known questions (conf ≥ tau_known = {c.tau_known:g}) prefer the correct answer to a "
        f"refusal; unknown ones (conf ≤ tau_unknown = {c.tau_unknown:g}) and unanswerable ones prefer a "
        f"refusal ({refusal}) to the model's own wrong answer; mixed ones use correct ≻ incorrect and "
        f"refusal ≻ incorrect, here {mixed}. It starts from, and is anchored to (the DPO reference), the "
        f"{TITLES.get(M.start_method(method, cfg.train.dpo_init) or '', 'base')} model."
    )


def results_section(metrics: pd.DataFrame, splits: Mapping[str, str], method: str) -> list[str]:
    """The run's tables, as the report draws them, for every model the run scored."""
    order = method_order(sorted(set(metrics[S.METHOD])))
    out = [
        "## Results of this run",
        "",
        "Each answer scores +1 if right, 0 if it is a refusal, −1 if wrong: Acc is the share right, RefR "
        "the share refused and **s_trust = 2·Acc + RefR − 100** (all in %), the mean score ×100. Refusing "
        f"pays exactly where the answer would have been wrong. This model is the row `{method}`; **bold** "
        "is the best per column.",
        "",
    ]
    for section, datasets, average in split_sections(metrics, splits):
        out += [
            f"### {section.title}",
            "",
            split_table(metrics, datasets, order, section.columns, average),
            "",
        ]
        out += [(sets_line(metrics, datasets) + section.caption).strip(), ""]
    return out


def prompt_text(cfg, question: str) -> str:
    """An open question as the model saw every item: the project's own renderer and chat format
    (`model.prompt`), so the card cannot drift from what the scores were measured under."""
    return format_prompt(render_prompt(question, None, cfg.prompt), image=True, system=cfg.prompt.system)


def usage_section(e: Exported, cfg) -> list[str]:
    """How to prompt it, how to load it with transformers (+ peft), how to put the folder on the Hub."""
    base = e.base_repo or e.base_location
    revision = f', revision="{e.base_revision}"' if e.base_revision else ""
    example = prompt_text(cfg, "What colour is the car?")
    shown = prompt_text(cfg, "{question}").replace("\n", "\\n")
    lines = [
        "import torch",
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
    ]
    if e.adapter:
        lines.insert(2, "from peft import PeftModel")
    lines += ["", f'export = "{ADAPTER_PLACEHOLDER}"  # this folder, or the Hub repo you uploaded it to']
    if e.adapter:
        lines += [
            f'base = AutoModelForImageTextToText.from_pretrained("{base}"{revision}, dtype=torch.{cfg.model.dtype})',
            "model = PeftModel.from_pretrained(base, export).eval()",
        ]
    else:
        lines.append(
            f"model = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.{cfg.model.dtype}).eval()"
        )
    lines += [
        "processor = AutoProcessor.from_pretrained(export)",
        f"prompt = {example!r}",
        f'inputs = processor(images=Image.open("{IMAGE_PLACEHOLDER}").convert("RGB"), text=prompt, return_tensors="pt")',
        f"out = model.generate(**inputs, max_new_tokens={cfg.eval.max_new_tokens}, do_sample=False)",
        'print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]  # fmt: skip
    pad = (
        " Images were padded to a square of the processor's mean colour before the processor (LLaVA's "
        "`expand2square`); do the same for the scores above."
        if cfg.model.image_aspect == "pad"
        else ""
    )
    return [
        "## How to use",
        "",
        f"Ask in the format the scores were measured under, `{shown}` for an open question; a "
        f"multiple-choice question lists its options as `A. <option>` lines after the question and ends "
        f"with `{cfg.prompt.multiple_choice}` instead. The scores are of greedy answers.{pad}",
        "",
        "```python",
        *lines,
        "```",
        "",
        *(["`model.merge_and_unload()` folds the adapter into the base for faster generation.", ""] if e.adapter else []),
        "## Upload to the Hub",
        "",
        "This folder is a complete Hub repository. With `huggingface_hub` (log in first: `hf auth login`):",
        "",
        "```bash",
        "hf upload YOUR_ORG/YOUR_REPO . .   # huggingface_hub < 1.0: huggingface-cli upload YOUR_ORG/YOUR_REPO . .",
        "```",
        "",
        "```python",
        "from huggingface_hub import HfApi",
        'HfApi().upload_folder(folder_path=".", repo_id="YOUR_ORG/YOUR_REPO", repo_type="model")',
        "```",
        "",
    ]  # fmt: skip


def render_card(cfg, e: Exported, metrics: pd.DataFrame, splits: Mapping[str, str]) -> str:
    """The whole README.md (pure: no I/O). `metrics`: the run's metrics table; `splits`: data set -> split."""
    kind = "LoRA adapter" if e.adapter else "model"
    title = f"# {TITLES[e.method]} {kind} of {e.base_repo or 'the run base'} (InBoL)"
    if e.base_id:
        base = f"Base model: [`{e.base_id}`](https://huggingface.co/{e.base_repo})"
        base += (
            "; this folder holds only the adapter's weights, loaded on it."
            if e.adapter
            else f", fine-tuned {'and merged ' if cfg.train.lora else ''}into this full model."
        )
    else:
        base = (
            f"Base model: the run's own base at `{e.base_location}` (no public Hub id was given"
            + ("; the adapter loads only where that folder is" if e.adapter else "")
            + "): export again with `--base-id ORG/NAME` to name it before sharing."
        )
    out = [front_matter(e), title, "", method_paragraph(e.method, cfg), "", base, ""]
    if e.license == "other":
        out += [
            "License: the base model's terms apply (its card names none here; export with `--license`).",
            "",
        ]
    if cfg.model.build_tiny:
        out += [
            "**A test model.** This is the project's tiny LLaVA trained on ShapesWorld, its procedural "
            "benchmark: it exists to exercise the pipeline end to end and knows nothing about real images.",
            "",
        ]
    out += results_section(metrics, splits, e.method)
    out += recipe_section(cfg, M.training_order([e.method], cfg.train.dpo_init))
    out += usage_section(e, cfg)
    out += [
        "## Provenance",
        "",
        f"Exported from the run `{e.run_dir}` by `python -m jobs.export` (inbol-ray).",
        "",
    ]
    out += [f"- {label}: `{value}`" for label, value in e.provenance.items()] + [""]
    return "\n".join(out)


def training_sets(keys: pd.DataFrame, cfg) -> tuple[str, ...]:
    """The data sets of split `train` (what the method was trained on), each by its Hub id when the config
    names one as its path, else by its name."""
    from inbol_ray.hub import hub_ref

    names = sorted(set(keys.loc[keys[S.SPLIT] == "train", S.DATASET]))
    # Only a `datasets` release names a Hub id: a published-format path like `vqav2/x.json` looks like one.
    releases = [d for d in cfg.data.datasets if d.format == "hf" and hub_ref(d.path) is not None]
    hub_ids = {d.name: str(hub_ref(d.path)) for d in releases}
    return tuple(hub_ids.get(n, n) for n in names)


def card_for(cfg, layout, e: Exported) -> str:
    """The card of `e` from the run's metrics and items (`layout`: the run's `RunLayout`)."""
    splits = dataset_splits(read_item_keys(layout.items))
    metrics = dio.read_table(layout.metrics).to_pandas()
    return render_card(cfg, e, metrics, splits)


__all__: Sequence[str] = ["Exported", "card_for", "front_matter", "render_card", "training_sets"]
