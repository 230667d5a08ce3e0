"""The prompt/response seam under a Llama SentencePiece tokenizer (LLaVA-1.5's), not only the tiny BPE.

Training (`batching.encode_prompt_response`, `train.data.encode_table`), the reference pass (the same
`encode_table` + `make_batch`) and sampling (`batching.encode_prompts` for transformers; the same text
through the processor for vLLM) must agree on two things, or DPO/SFT score token sequences the model never
emits:
- the prompt ids of a row are the ids the sampler fed the model (the training prefix is what sampling
  conditioned on);
- the response ids are the tokens that follow those prompt ids in tokens(prompt + response), i.e. what the
  model reads (and, trained on that, emits) after "ASSISTANT:", ending with EOS, and decoding to the
  response text as `clean_response` returns it.

The tiny checkpoint's byte-level BPE cannot show a seam problem: its pre-tokenizer splits ":" from " B",
and " B" is the same token alone or after the prompt. SentencePiece can: it marks a word's leading space
with '▁' inside the word's piece and adds a dummy '▁' prefix to a text, so " B" tokenised on its own is
['▁▁', 'B'] (sentencepiece itself, and the legacy Prepend normaliser of Llama tokenizer.json files, which
transformers 4 used for llava-hf) while after "ASSISTANT:" it is ['▁B']. transformers 5's LlamaTokenizer
rebuilds the pipeline as Metaspace(prepend_scheme="first"), which does not double the '▁' and happens to
agree; the encoder must be right for both, so both are tested.

The Llama tokenizer here is a SentencePiece BPE model trained in a second on the tiny model's corpus, with
the settings of Llama's tokenizer.model (byte fallback, split digits, dummy prefix, identity normalisation,
whitespace-only pieces), loaded the way a user's llava-hf/llava-1.5-7b-hf is: `AutoTokenizer` over
tokenizer.model + a tokenizer_config.json with llava-hf's values (LlamaTokenizer, legacy false,
add_bos_token true, add_eos_token false, `<image>` and `<pad>` added special tokens after the SentencePiece
vocabulary, left padding).
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from inbol_ray import schema as S
from inbol_ray.config import PromptConfig, ShapesConfig
from inbol_ray.model.batching import encode_prompt_response, encode_prompts, encode_responses
from inbol_ray.model.generation import clean_response, encode_batch
from inbol_ray.model.prompt import IMAGE_TOKEN, format_prompt, format_response, render_prompt
from inbol_ray.model.tiny import build_processor, model_config, tokenizer_corpus
from inbol_ray.refusal import REFUSAL_TEMPLATES
from inbol_ray.train.data import DPO_KINDS, SFT_KINDS, encode_table, make_batch
from inbol_ray.train.shared_prefix import per_response, shared_prefix_token_logprobs

spm = pytest.importorskip("sentencepiece")

# (question, options or None, response): open questions, a number, multiple choice with letter answers,
# refusals, a multi-word answer.
CASES = [
    ("How many circles are there?", None, "2"),
    ("What colour is the square?", None, "red"),
    ("What is left of the star?", None, "the big green circle"),
    ("Which shape is red?", ["circle", "square", "triangle", "I don't know"], "B"),
    ("Which shape is blue?", ["circle", "square", "triangle", "I don't know"], "A"),
    ("Is the circle above the square?", None, "I don't know."),
    ("How many shapes are there?", None, REFUSAL_TEMPLATES[0]),
]
PROMPTS = [render_prompt(q, choices, PromptConfig()) for q, choices, _ in CASES]
RESPONSES = [r for _, _, r in CASES]


def _png(colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}  # fmt: skip


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.model (SentencePiece BPE, Llama's settings) + llava-hf's tokenizer_config.json values."""
    out = tmp_path_factory.mktemp("llama_sp")
    lines = tokenizer_corpus(ShapesConfig(), PromptConfig())
    # Counting answers as digits too, as real data has them ("2"): Llama splits digits into single pieces.
    lines += [f"How many shapes are there? {n}" for n in range(10)]
    lines += [format_response(str(n)) for n in range(10)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out / "tokenizer"),
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    n = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).get_piece_size()
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): _special(token)
            for i, token in [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (n, IMAGE_TOKEN), (n + 1, "<pad>")]
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _llama(directory: Path):
    from transformers import AutoTokenizer, LlamaTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    assert isinstance(tok, LlamaTokenizer)
    return tok


def _legacy_json(directory: Path):
    """The same vocabulary through the legacy tokenizer.json pipeline (Prepend('▁') + Replace(' ', '▁')
    normaliser, no pre-tokenizer), which transformers 4 loaded for Llama checkpoints such as llava-hf's."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(_llama(directory).backend_tokenizer)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", clean_up_tokenization_spaces=False,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["tiny_bpe", "llama", "llama_legacy_json"])
def processor(request, tiny_checkpoint: Path, tiny_config, llama_tokenizer_dir: Path):
    """A LlavaProcessor with the tiny checkpoint's image processor and one of the three tokenizers."""
    from transformers import AutoProcessor

    if request.param == "tiny_bpe":
        return AutoProcessor.from_pretrained(tiny_checkpoint)
    make = _llama if request.param == "llama" else _legacy_json
    return build_processor(tiny_config.model, make(llama_tokenizer_dir))


def _expanded(processor, prompt: str) -> str:
    """The generation prompt with the image placeholder expanded, as the model's input holds it."""
    n = len([i for i in encode_prompts(processor, [prompt])[0] if i == processor.image_token_id])
    return format_prompt(prompt).replace(IMAGE_TOKEN, IMAGE_TOKEN * n)


def test_llama_seam_differs_when_the_response_is_tokenised_alone(llama_tokenizer_dir: Path) -> None:
    """What the fix is for: with sentencepiece itself and the legacy pipeline, a response tokenised on
    its own starts with an extra whitespace-only piece that the same text after the prompt does not have."""
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_dir / "tokenizer.model"))
    prompt = format_prompt(PROMPTS[3]).split("\n")[-1]  # the text after the image: "...directly. ASSISTANT:"
    alone = sp.encode(format_response("B"), out_type=str)
    after = sp.encode(prompt + format_response("B"), out_type=str)[len(sp.encode(prompt, out_type=str)) :]
    assert alone[0].strip("▁") == "" and len(alone) == len(after) + 1, (alone, after)
    legacy = _legacy_json(llama_tokenizer_dir)
    alone = legacy.tokenize(format_response("B"))
    ids = encode_responses(legacy, ["B"], [PROMPTS[3]], add_eos=False)[0]
    assert alone[0].strip("▁") == "" and len(alone) == len(ids) + 1, (alone, ids)
    assert legacy.convert_ids_to_tokens(ids) == after  # the encoder gives sentencepiece's in-context pieces


def test_rows_are_the_tokens_of_prompt_plus_response(processor) -> None:
    """(a) input_ids = tokens(expanded prompt + response) + EOS, the response mask on its tail; the prompt
    part is `encode_prompts`' ids, so the response follows exactly what generation conditions on."""
    tok = processor.tokenizer
    images = [_png()] * len(CASES)
    batch = encode_prompt_response(processor, images, PROMPTS, RESPONSES)
    prompt_ids = encode_prompts(processor, PROMPTS)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        full = tok(_expanded(processor, prompt) + format_response(response), add_special_tokens=True)
        want = full["input_ids"] + [tok.eos_token_id]
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == want, (response, tok.convert_ids_to_tokens(want))
        assert want[: len(prompt_ids[i])] == prompt_ids[i]
        mask = batch["response_mask"][i, :n].tolist()
        assert mask == [False] * len(prompt_ids[i]) + [True] * (n - len(prompt_ids[i]))
        labels = batch["labels"][i, :n]
        assert labels[torch.tensor(mask)].tolist() == want[len(prompt_ids[i]) :]


def test_prompt_ids_are_what_the_samplers_feed(processor) -> None:
    """(b) the training/reference prefix is the sampler's input: transformers' engine left-pads
    `encode_prompts` (`encode_batch`/`generate_responses`); the processor on the same text (what vLLM's
    LLaVA processor and a user's `processor(text, images)` do) gives the same ids."""
    prompt_ids = encode_prompts(processor, PROMPTS)
    ids, mask, _ = encode_batch(processor, [_png()] * len(PROMPTS), PROMPTS)
    for i, row in enumerate(prompt_ids):
        assert ids[i][mask[i].bool()].tolist() == row
        enc = processor(text=[format_prompt(PROMPTS[i])], images=[Image.open(io.BytesIO(_png()))])
        assert list(enc["input_ids"][0]) == row
        assert row[0] == processor.tokenizer.bos_token_id


def test_responses_end_with_eos_and_decode_to_the_text(processor) -> None:
    """(c) one EOS, last; (d) what the engines' decoding (`batch_decode(..., skip_special_tokens=True)` then
    `clean_response`) makes of the ids, padding after EOS included, is the response text."""
    tok = processor.tokenizer
    responses = encode_responses(tok, RESPONSES, PROMPTS)
    width = max(len(r) for r in responses) + 2
    # Padded after EOS, as sample_shared_prefill returns finished rows.
    generated = [r + [tok.pad_token_id] * (width - len(r)) for r in responses]
    decoded = [clean_response(t) for t in tok.batch_decode(generated, skip_special_tokens=True)]
    for ids, text, response in zip(responses, decoded, RESPONSES, strict=True):
        assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        assert text == response.strip()


def test_training_tables_encode_like_the_encoder(processor) -> None:
    """`encode_table` (training and the reference pass) gives the prefixes and responses of
    `encode_prompt_response` for SFT and CA-DPO tables, absent responses staying absent."""
    n = len(CASES)
    image = _png()
    sft = pa.Table.from_pylist(
        [{S.ID: str(i), S.IMAGE: image, S.IMAGE_PATH: None, S.PROMPT: PROMPTS[i], S.TARGET: RESPONSES[i],
          S.TARGET_KIND: "answer"} for i in range(n)],
        schema=S.SFT,
    )  # fmt: skip
    enc = encode_table(sft, processor, SFT_KINDS)
    batch = encode_prompt_response(processor, [image] * n, PROMPTS, RESPONSES)
    for i in range(n):
        m = batch["attention_mask"][i].bool()
        assert enc.prefixes[i] + enc.responses[i][0] == batch["input_ids"][i][m].tolist()
    rows = [{S.ID: str(i), S.IMAGE: image, S.IMAGE_PATH: None, S.PROMPT: PROMPTS[i],
             S.RESP_CORRECT: RESPONSES[i] if i % 2 else None, S.RESP_INCORRECT: None if i % 2 else "blue",
             S.RESP_REFUSAL: "I don't know.", S.CONF: 0.5, S.BUCKET: "known"} for i in range(n)]  # fmt: skip
    enc = encode_table(pa.Table.from_pylist(rows, schema=S.CADPO_PAIRS), processor, DPO_KINDS)
    for k, kind in enumerate(DPO_KINDS):
        texts = [r[kind] for r in rows]
        want = encode_responses(processor.tokenizer, texts, PROMPTS)
        assert [enc.responses[i][k] for i in range(n)] == want
        for i, text in enumerate(texts):
            if text is not None:
                full = processor.tokenizer(format_prompt(PROMPTS[i]) + format_response(text))["input_ids"]
                assert full[len(full) - len(want[i]) + 1 :] == want[i][:-1]


def test_training_logprobs_score_the_full_string_tokens(processor, tiny_config) -> None:
    """The reference/training forward (`encode_table` + `make_batch` + the shared-prefix forward) gives
    each response the log-prob a plain forward over tokens(expanded prompt + response) + EOS assigns to the
    tokens after the prompt: the log-prob of emitting them after the generation prompt."""
    from transformers import LlavaForConditionalGeneration

    from inbol_ray.model.batching import pixel_values

    tok = processor.tokenizer
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(model_config(tiny_config.model, tok)).double().eval()
    image = _png((30, 120, 200))
    rows = [{S.ID: str(i), S.IMAGE: image, S.IMAGE_PATH: None, S.PROMPT: PROMPTS[i], S.RESP_CORRECT: RESPONSES[i],
             S.RESP_INCORRECT: None, S.RESP_REFUSAL: "I don't know.", S.CONF: 0.9, S.BUCKET: "known"}
            for i in (0, 3, 6)]  # fmt: skip
    enc = encode_table(pa.Table.from_pylist(rows, schema=S.CADPO_PAIRS), processor, DPO_KINDS)
    packed, _ = make_batch(enc, range(len(rows)), processor)
    packed = packed.to("cpu", pixel_dtype=torch.float64)
    with torch.no_grad():
        got = per_response(shared_prefix_token_logprobs(model, packed), packed)
        pv = pixel_values(processor, [image]).double()
        for b, row in enumerate(rows):
            prompt_len = len(encode_prompts(processor, [row[S.PROMPT]])[0])
            for k, kind in enumerate(DPO_KINDS):
                if row[kind] is None:
                    assert torch.isnan(got[b, k])
                    continue
                text = _expanded(processor, row[S.PROMPT]) + format_response(row[kind])
                ids = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id]])
                logp = model(input_ids=ids, pixel_values=pv).logits[0, :-1].log_softmax(-1)
                targets = ids[0, 1:]
                want = logp.gather(-1, targets[:, None])[prompt_len - 1 :].sum()
                assert torch.allclose(got[b, k], want, atol=1e-6), (kind, float(got[b, k]), float(want))


class _MergingTokenizer:
    """Characters as ids, except that ": " is one token: the prompt's last token (":") merges with the
    response's leading space, so tokens(prompt) is not a prefix of tokens(prompt + response)."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        def ids(text: str) -> list[int]:
            return [1 if part == ": " else ord(part) for part in _split(text)]

        return {"input_ids": [ids(t) for t in texts] if isinstance(texts, list) else ids(texts)}


def _split(text: str) -> list[str]:
    out, i = [], 0
    while i < len(text):
        step = 2 if text[i : i + 2] == ": " else 1
        out.append(text[i : i + step])
        i += step
    return out


def test_a_tokenizer_merging_across_the_seam_falls_back_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="merges the prompt's last token"):
        ids = encode_responses(_MergingTokenizer(), ["B", None], ["Which?", "Why?"])
    assert ids == [[ord(" "), ord("B"), 0], None]
