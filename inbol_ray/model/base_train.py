"""Short supervised training that turns the random tiny checkpoint into the embedded default's base model.

Why: InBoL needs a base model with an information boundary — items it knows (easy perception, common
invented names) and items it does not (counting, relations, rare names). A brief training on the
*answerable* ShapesWorld pretrain items gives that spread; it never sees a refusal, so, like LLaVA-1.5, it
answers everything. Single process: at this size a Ray Train launch would cost more than the training.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from inbol_ray import progress
from inbol_ray import schema as S
from inbol_ray.checkpoint import load_model, save_model, upload_dir
from inbol_ray.config import BaseTrainConfig, PromptConfig
from inbol_ray.data import io as dio
from inbol_ray.model.batching import IGNORE_INDEX, encode_prompt_response, pixel_values
from inbol_ray.model.frozen_features import input_embeddings, precompute_vision_features, vision_features
from inbol_ray.model.generation import generate_responses
from inbol_ray.model.prompt import render_prompt


def lr_at(step: int, cfg: BaseTrainConfig) -> float:
    """Linear warm-up then cosine decay to 10%: stable for a from-scratch ViT+LM at a high rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def encode_rows(
    processor, pv: torch.Tensor, questions: list[str], answers: list[str], system: str = ""
) -> dict:
    """Token ids, attention mask and labels [N, T_max] of every training row, encoded once.

    The one call to the shared encoder: all rows at once, right-padded, so `batch_rows` cutting a batch
    to its longest row gives exactly what encoding that batch alone gives.
    """
    enc = encode_prompt_response(processor, pv, questions, answers, system=system)
    return {k: enc[k] for k in ("input_ids", "attention_mask", "labels")}


def batch_rows(encoded: dict, idx: np.ndarray) -> dict:
    """Rows `idx` of `encode_rows`' output, padded to the longest of them."""
    index = torch.as_tensor(idx)
    width = int(encoded["attention_mask"][index].sum(1).max())
    return {k: v[index, :width] for k, v in encoded.items()}


def _can_cut_last_layer(lm: torch.nn.Module) -> bool:
    """A Llama-style decoder (the tiny model's LM) under sdpa, which takes a boolean [B, 1, T, T] mask."""
    layer = lm.layers[-1] if hasattr(lm, "layers") else None
    attn = getattr(layer, "self_attn", None)
    return (
        getattr(lm.config, "_attn_implementation", None) == "sdpa"
        and hasattr(lm, "rotary_emb")
        and all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp"))
        and all(
            hasattr(attn, n)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "attention_dropout")
        )
    )


def answer_hidden(
    model: torch.nn.Module,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    cut_last_layer: bool = True,
) -> torch.Tensor:
    """Final hidden states [N, D] of the language model at positions (rows, cols) only.

    Every layer but the last runs at all positions (the last one reads their keys and values); the last
    layer computes keys and values at all positions but its query, attention output, MLP and the final
    norm only at the N requested positions (2 per row in base training). Same values as
    `language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state[rows, cols]`
    up to float rounding; with `cut_last_layer=False` (or an LM this does not know) it is exactly that.
    """
    lm = model.model.language_model
    if not (cut_last_layer and _can_cut_last_layer(lm)):
        return lm(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state[rows, cols]
    from transformers.models.llama.modeling_llama import rotate_half

    batch, width, _ = embeds.shape
    position_ids = torch.arange(width, device=embeds.device).unsqueeze(0)
    cos, sin = lm.rotary_emb(embeds, position_ids=position_ids)  # [1, T, head_dim]
    valid = attention_mask.bool()
    causal = torch.ones(width, width, dtype=torch.bool, device=embeds.device).tril()
    mask = causal[None, None] & valid[:, None, None, :]  # [B, 1, T, T], True = attend
    hidden = embeds
    for layer in lm.layers[:-1]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position_ids)
    layer = lm.layers[-1]
    attn = layer.self_attn
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)
    key = attn.k_proj(x).view(batch, width, -1, head_dim).transpose(1, 2)  # [B, H_kv, T, hd]
    key = key * cos[:, None] + rotate_half(key) * sin[:, None]
    value = attn.v_proj(x).view(batch, width, -1, head_dim).transpose(1, 2)
    n = rows.numel()
    query = attn.q_proj(x[rows, cols]).view(n, -1, head_dim)  # [N, H, hd]
    cos_q, sin_q = cos[0, cols][:, None], sin[0, cols][:, None]
    query = (query * cos_q + rotate_half(query) * sin_q).unsqueeze(2)  # [N, H, 1, hd]
    # index_select, not key[rows]: rows repeat (each row's answer and EOS), and advanced indexing's backward
    # (index_put_ with accumulate) sums the duplicates in an order that varies with thread scheduling on
    # CPU under load: one config trained two different bases (easy perception 93% vs 53%) next to Ray.
    key, value = key.index_select(0, rows), value.index_select(0, rows)  # [N, H_kv, T, hd]
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    sees = (torch.arange(width, device=cols.device)[None] <= cols[:, None]) & valid[rows]  # [N, T]
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=sees[:, None, None, :],
        dropout_p=attn.attention_dropout if attn.training else 0.0,  # as LlamaAttention
        scale=attn.scaling,
    )
    h = hidden[rows, cols] + attn.o_proj(out.reshape(n, -1))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return lm.norm(h)


def response_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor,
    cut_last_layer: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """`model(input_ids, pixel_values, attention_mask, labels=labels).loss` from `vision_features`.

    Mean (or with `reduction="sum"` summed) next-token cross-entropy over the labelled tokens, as
    transformers' causal-LM loss, but the lm_head and log-softmax (and the last layer's query side, see
    `answer_hidden`) run only at the positions that predict a labelled token: a row's answer and EOS,
    2 of its ~30 positions here.
    """
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    embeds = input_embeddings(model, input_ids, features)
    hidden = answer_hidden(model, embeds, attention_mask, rows, cols, cut_last_layer)
    logits = model.lm_head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets[rows, cols], reduction=reduction)


# Fixed cost of one extra forward + backward call (kernel launches, Python), in padded tokens: ~15 ms
# against ~0.07 ms per token for the tiny model on 2 CPU threads (measured for `length_groups`).
GROUP_COST_TOKENS = 200


def length_groups(lengths: np.ndarray, cost_per_group: float = GROUP_COST_TOKENS) -> list[np.ndarray]:
    """Split a batch into groups of similar length, each padded only to its own longest row.

    Minimises sum over groups of (rows x longest length + `cost_per_group`) by dynamic programming over
    the rows sorted by length. A few long rows (ShapesWorld's hint and context questions run to ~60
    tokens against ~30 for most) would otherwise double the padded width of the whole batch.
    Returns positions into `lengths`, every one exactly once.
    """
    order = np.argsort(lengths, kind="stable")
    ends = lengths[order]
    n = len(ends)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * float(ends[j - 1]) + cost_per_group
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def batch_loss_backward(
    model: torch.nn.Module,
    encoded: dict,
    idx: np.ndarray,
    features_of: Callable[[np.ndarray], torch.Tensor],
    cost_per_group: float = GROUP_COST_TOKENS,
) -> float:
    """Backpropagate the batch's mean answer-token loss (as `model(**batch).loss`); return its value.

    The rows run in `length_groups`, each its own forward and backward of its share of the mean (its
    summed token losses over the batch's token count), so the gradients add up to the batch's.
    `features_of(rows)` gives the rows' `vision_features` (cached, or computed with grad).
    """
    lengths = encoded["attention_mask"][torch.as_tensor(idx)].sum(1).numpy()
    total = int((encoded["labels"][torch.as_tensor(idx), 1:] != IGNORE_INDEX).sum())
    loss = 0.0
    for group in length_groups(lengths, cost_per_group):
        rows = idx[group]
        part = (
            response_loss(model, **batch_rows(encoded, rows), features=features_of(rows), reduction="sum")
            / total
        )
        part.backward()
        loss += part.item()
    return loss


class BaseTraining:
    """The base training's state and step; `train_base` runs it. Split out so a benchmark can step it.

    Before the loop: rows are tokenized once (`encode_rows`) and, with a frozen vision tower
    (`vision_lr_scale` 0), its features are computed once per image. Per step: the seeded batch is cut
    from the encoded rows in length groups (`batch_loss_backward`), its loss is `response_loss`, and a
    fused AdamW steps. Same data order, schedule, loss and gradients (to float rounding) as
    `model(**batch).loss` on batches encoded per step (tests/unit/test_base_train.py).
    """

    def __init__(
        self,
        init_dir: str,
        items: pa.Table,
        cfg: BaseTrainConfig,
        prompt: PromptConfig | None = None,
        image_aspect: str = "crop",
    ) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads)
        self.model, self.processor = load_model(init_dir)
        self.model.train()
        vision = self.model.model.vision_tower
        frozen_vision = cfg.vision_lr_scale == 0
        if frozen_vision:
            vision.requires_grad_(False)
        train = items.filter(
            pa.compute.and_(pa.compute.equal(items[S.SPLIT], "pretrain"), items[S.ANSWERABLE])
        )
        # By id: the order `items` reads back in follows how prepare's Ray Data tasks cut it into files,
        # which varied between runs (1536 of 9500 positions), and the seeded data order is a permutation.
        train = train.sort_by(S.ID)
        if train.num_rows == 0:
            raise ValueError("base training: no answerable rows with split 'pretrain' in items")
        self.n_rows = train.num_rows
        answers = [a[0] for a in train[S.ANSWERS].to_pylist()]
        pv = pixel_values(self.processor, train[S.IMAGE].to_pylist(), image_aspect)
        # The one renderer: the base learns the prompts every later stage shows it (prompt.render_prompt).
        prompts = [
            render_prompt(q, c, prompt)
            for q, c in zip(train[S.QUESTION].to_pylist(), train[S.CHOICES].to_pylist(), strict=True)
        ]
        system = prompt.system if prompt is not None else ""
        self.encoded = encode_rows(self.processor, pv, prompts, answers, system)
        # A frozen tower's output is fixed: compute it once per image and drop the pixels.
        self.features = precompute_vision_features(self.model, pv) if frozen_vision else None
        self.pixel_values = None if frozen_vision else pv
        vision_ids = {id(p) for p in vision.parameters()}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in self.params if id(p) not in vision_ids], "scale": 1.0},
            {"params": [p for p in self.params if id(p) in vision_ids], "scale": cfg.vision_lr_scale},
        ]
        self.opt = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=(0.9, 0.98),
            fused=True,  # one kernel over all parameters instead of ~10 ops per tensor
        )

    def batches(self) -> Iterator[tuple[int, np.ndarray]]:
        """(step, row indices) for every step: seeded permutations, a fresh one when the rest is short."""
        rng = np.random.default_rng(self.cfg.seed)
        order, pos = rng.permutation(self.n_rows), 0
        for step in range(self.cfg.steps):
            if pos + self.cfg.batch_size > len(order):
                order, pos = rng.permutation(self.n_rows), 0
            yield step, order[pos : pos + self.cfg.batch_size]
            pos += self.cfg.batch_size

    def step(self, step: int, idx: np.ndarray) -> float:
        """One optimizer step on rows `idx`; returns the loss."""
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, self.cfg) * group["scale"]
        self.opt.zero_grad(set_to_none=True)
        loss = batch_loss_backward(self.model, self.encoded, idx, self._features)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss

    def _features(self, rows: np.ndarray) -> torch.Tensor:
        if self.features is not None:
            return self.features[rows]
        return vision_features(self.model, self.pixel_values[rows])

    def save(self, out_dir: str) -> str:
        self.model.eval()
        fs, path = dio.resolve(out_dir)
        if isinstance(fs, pafs.LocalFileSystem):
            save_model(self.model, self.processor, path)
        else:  # transformers writes local files only: save, then copy to the object store
            with tempfile.TemporaryDirectory() as tmp:
                upload_dir(save_model(self.model, self.processor, tmp), out_dir)
        return out_dir


def train_base(
    init_dir: str,
    items: pa.Table,
    out_dir: str,
    cfg: BaseTrainConfig,
    log: Callable[[str], None] = print,
    prompt: PromptConfig | None = None,
    image_aspect: str = "crop",
) -> str:
    """Train on the answerable rows of `items` (split `pretrain`) and save an HF checkpoint to `out_dir`.

    `init_dir`, `out_dir`: local paths or URIs (the run layout's `tiny_init` and `base_model`); returns
    `out_dir`. Prompts are rendered with `prompt` (the run's `cfg.prompt`), images shaped by `image_aspect`
    (`model.image_aspect`), as every later stage shows them.
    """
    run = BaseTraining(init_dir, items, cfg, prompt, image_aspect)
    t0, ema = time.time(), None
    with progress.bar("base training", cfg.steps, unit="steps") as bar:
        for step, idx in run.batches():
            loss = run.step(step, idx)
            ema = loss if ema is None else 0.95 * ema + 0.05 * loss
            bar.update(step + 1, loss=round(ema, 3))
    final = "–" if ema is None else f"{ema:.3f}"  # per-tenth losses: the run's logs/ (inbol_ray.console)
    log(f"  base training: {cfg.steps} steps, loss {final} ({time.time() - t0:.0f}s)")
    return run.save(out_dir)


def family_accuracy(
    model_dir: str,
    items: pa.Table,
    dataset: str,
    rare_names: set[str],
    batch_size: int = 64,
    max_new_tokens: int = 6,
    prompt: PromptConfig | None = None,
    image_aspect: str = "crop",
) -> dict[str, tuple[int, float]]:
    """Greedy accuracy per question family on the answerable items of one data set, knowledge split into
    common / rare names.

    This is the spread the whole method needs; the main job prints it (on the validation set) so a user
    sees the boundary.
    """
    from inbol_ray.grading import grade

    model, processor = load_model(model_dir)
    rows = [
        r for r in items.filter(pa.compute.equal(items[S.DATASET], dataset)).to_pylist() if r[S.ANSWERABLE]
    ]
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        outs = generate_responses(
            model,
            processor,
            [r[S.IMAGE] for r in chunk],
            [render_prompt(r[S.QUESTION], r[S.CHOICES], prompt) for r in chunk],
            max_new_tokens=max_new_tokens,
            image_aspect=image_aspect,
            system=prompt.system if prompt is not None else "",
        )
        for r, (resp,) in zip(chunk, outs, strict=True):
            family = r[S.CATEGORY]
            if family == "knowledge":
                family += "_rare" if r[S.ANSWERS][0] in rare_names else "_common"
            ok = bool(r[S.ANSWERS]) and grade(resp, r[S.ANSWERS], r[S.METRIC], r[S.CHOICES])
            hits.setdefault(family, []).append(ok)
    return {fam: (len(v), float(np.mean(v))) for fam, v in sorted(hits.items())}
