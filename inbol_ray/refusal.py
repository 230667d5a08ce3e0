"""Refusal templates (training targets) and the refusal detector (evaluation).

The detector decides the middle term of the user-centric score (+1 correct, 0 refusal, -1 wrong), so its
two failure modes cost differently: calling a short answer ("No", "none", "0") a refusal would turn a
right answer into 0 and a wrong one into a free pass, so every cue here is a *phrase* of inability or
uncertainty, never a bare negative word. Precision/recall on a labelled list of real phrasings is
reported by tests/unit/test_refusal.py (fixture tests/fixtures/refusal_phrasings.tsv).

Cues come in three strengths:
- strong: inability or missing information ("I cannot determine", "not visible", "unanswerable") - always
  a refusal;
- hedge: uncertainty ("I'm not sure", "hard to tell", "unclear") - a refusal unless the response still
  commits to an answer ("..., but it might be a cat");
- absence: "there is no X in the image", "I don't see any X" - a refusal unless the response opens with a
  plain yes/no, in which case it is the answer to a yes/no question.
"""

from __future__ import annotations

import functools
import hashlib
import re

REFUSAL_TEMPLATES_VERSION = "v1"
"""Bump when REFUSAL_TEMPLATES changes: constructed tables and checkpoints depend on the exact strings."""

REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I don't know.",
    "Sorry, I cannot answer this question based on the image.",
    "I am not sure.",
    "The image does not contain enough information to answer this question.",
    "I cannot determine the answer from the image.",
)
"""Training refusals. Index 0 is the default (short: survives a small max_new_tokens)."""


def refusal_target(item_id: str, index: int) -> str:
    """The refusal used as a training target for one item.

    index >= 0 picks that template; -1 rotates over templates by a hash of the item id that is stable
    across processes and Python versions (builtin hash() is salted per process, which would make the
    constructed tables differ between runs and workers).
    """
    if index >= 0:
        if index >= len(REFUSAL_TEMPLATES):
            raise ValueError(f"refusal template index {index} out of range (0..{len(REFUSAL_TEMPLATES) - 1})")
        return REFUSAL_TEMPLATES[index]
    if index != -1:
        raise ValueError(f"refusal template index must be >= 0 or -1 (rotate), got {index}")
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return REFUSAL_TEMPLATES[int.from_bytes(digest, "big") % len(REFUSAL_TEMPLATES)]


# --- detector -------------------------------------------------------------------------------------

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_LOC = r"(?:the |this |that )?(?:image|picture|photo|photograph|frame|scene|view)"
_IMG = r"(?:image|picture|photo|photograph|scene)"

# Active verbs after "I cannot ..." / "impossible to ..." and their passive forms ("cannot be read").
_VERB = (
    r"(?:determine|tell|say|answer|know|identify|see|discern|confirm|verify|ascertain|make out|read|judge|"
    r"infer|deduce|recogni[sz]e|provide|help(?: you)? with|assist|view|access|process|find|detect|locate|"
    r"count|distinguish|comment|guess|decide|specify|describe|analy[sz]e|interpret|speculate|perceive|"
    r"figure out|give (?:a|an|you)|be (?:sure|certain))"
)
_PASSIVE = (
    r"(?:determined|seen|identified|answered|read|known|confirmed|told|inferred|discerned|made out|"
    r"ascertained|deduced|verified|counted|located|recogni[sz]ed|judged|said)"
)
_CANNOT = r"(?:can ?not|can'?t|could ?not|couldn'?t)"
_ADV = r"(?:\w+ly |really |just |even |still )?"

_STRONG = [
    # first/second person or clause-initial inability; a third-person subject ("he cannot see") is an answer
    rf"(?:^|[,;:.!?]\s*|\b(?:i|we|one|you)\s+){_ADV}{_CANNOT}\s+{_ADV}{_VERB}\b",
    rf"(?:^|\b(?:i|we)(?: am|'m| are|'re)?\s+){_ADV}(?:unable|not able) to\s+{_ADV}{_VERB}\b",
    rf"\b(?:impossible|not possible|no way|no means|not be able)(?: for me)? to\s+{_ADV}{_VERB}\b",
    rf"\b{_CANNOT} be\s+{_ADV}{_PASSIVE}\b",
    r"\b(?:not possible|impossible) for me\b",
    r"\bno (?:way|means) of (?:know|tell|determin|say|confirm|verify)",
    # not knowing
    r"\b(?:i|we)\s+(?:really\s+|honestly\s+|just\s+|simply\s+)?(?:don'?t|do not)\s+know\b",
    r"^(?:don'?t|do not) know\b",
    r"\bno (?:idea|clue)\b",
    r"\bnot a clue\b",
    r"\b(?:idk|dunno)\b",
    # not visible / not determinable
    r"\b(?:not|isn'?t|aren'?t|wasn'?t|weren'?t)\s+(?:\w+ly\s+)?(?:visible|shown|depicted|discernible|discernable|"
    r"legible|readable|identifiable|apparent|evident|mentioned|provided|specified|indicated|determinable|"
    r"answerable|knowable|captured)\b",
    rf"\bnot (?:present|included) in {_LOC}\b",
    r"\b(?:illegible|unreadable|indiscernible|indeterminable|undeterminable|unidentifiable|unanswerable|"
    r"unknowable)\b",
    r"\b(?:is|are|remains) unknown\b",
    r"\b(?:out of|outside) (?:the )?(?:frame|view)\b",
    # image quality
    r"\btoo (?:blurry|blurred|dark|small|far(?: away)?|grainy|pixelated|bright|low[- ]?(?:res|resolution|quality)|"
    r"out of focus|obscured|distant|fuzzy)\b",
    rf"\b{_IMG}(?: is|'s)(?: very| quite| too| rather)? (?:blurry|blurred|dark|out of focus|grainy|pixelated|fuzzy|"
    r"obscured|low[- ](?:quality|resolution)|not clear|unclear)\b",
    rf"\b{_IMG} isn'?t clear\b",
    # missing information
    r"\b(?:not enough|insufficient|lack of|lacks|lacking|without (?:more|further|additional|sufficient|enough|"
    r"any))\s+(?:\w+\s+)?(?:information|context|details?|evidence|clues?|data)\b",
    r"\bwithout (?:a |being able to )?(?:clearer|better|closer|higher)\b",
    r"\bneed (?:more|additional|further) (?:information|context|details?)\b",
    r"\bmore (?:information|context|details?) (?:is|are|would be) (?:needed|required|necessary)\b",
    r"\bbeyond (?:my|the) (?:\w+ )?(?:abilit|capabilit|knowledge|scope)",
    r"\b(?:please|could you|can you|would you) (?:\w+ )?(?:provide|upload|share|send)\b",
    # question does not fit the image
    rf"\b(?:doesn'?t|does not|do not|don'?t) (?:match|correspond to|relate to|pertain to|apply to) {_LOC}\b",
    r"\b(?:unrelated|irrelevant|not related|not relevant) to (?:the |this )?(?:image|picture|photo|content)\b",
    r"\bquestion (?:is|seems|appears)(?: to be)? (?:\w+ )?(?:unrelated|irrelevant|not related|not relevant)\b",
    rf"\b{_IMG}\s+(?:does not|doesn'?t|did not|didn'?t)\s+(?:\w+ly\s+)?(?:provide|give|offer|reveal)\b",
    # assistant boilerplate
    r"\bas an ai\b",
    r"\b(?:i'?m|i am) (?:just |only )?an ai\b",
    r"^(?:i'?m |i am )?(?:so |very |really |terribly )?(?:sorry|apologies)\b[\s,.!]*(?:but\b|i\b|i'|as an\b|"
    r"there\b|the (?:image|picture|photo|question)\b|it'?s (?:not|impossible|difficult|hard)\b|this\b)",
    r"^(?:i |my )?apologi[sz]e\b",
    r"^my apologies\b",
    r"^i'?m afraid\b",
]

_HEDGE = [
    r"(?:^|\bi'?m |\bi am |\bwe'?re |\bwe are )(?:still |just |really |honestly )?not (?:\w+ )?(?:sure|certain|"
    r"confident)\b",
    r"(?:^|\bi'?m |\bi am |\bit is |\bit's )(?:\w+ )?(?:unsure|uncertain)\b",
    rf"\b{_CANNOT}\s+be\s+(?:\w+ )?(?:sure|certain)\b",
    rf"\b(?:hard|difficult|tricky|not easy|tough)\s+to\s+{_ADV}(?:tell|say|determine|know|judge|see|make out|"
    r"be sure|read|identify|discern|count|distinguish|answer)\b",
    r"\bunclear\b",
    r"\b(?:it|this|that|which)(?: is|'s) not (?:\w+ly )?clear(?:\s*[.!]*$|\s+(?:enough|from|in|what|whether|which|"
    r"who|how|if|where|why|when))",
    r"\bnot (?:\w+ly )?clear (?:enough|from (?:the|this))\b",
]

_ABSENCE = [
    rf"\bthere (?:is|are|'s) no\b[^.]*\b(?:in|on) {_LOC}\b",
    r"\bthere (?:is|are|'s) no (?:\w+ )?(?:visible|shown)\b",
    r"\b(?:i|we) (?:don'?t|do not|can'?t|cannot|can not) (?:\w+ly )?see (?:any|a|an|the)\b",
    rf"\b{_IMG}\s+(?:does not|doesn'?t|did not|didn'?t)\s+(?:\w+ly\s+)?(?:show|contain|depict|include|have|display|"
    r"feature|indicate)\b",
]

# A hedge followed by a guess is an answer ("not sure, but probably a cat"); "could be anything" is not.
_COMMIT = (
    r"\b(?:probably|likely|looks like|look like|appears to be|seems to be|might be|may be|could be|maybe|"
    r"perhaps|possibly|my (?:best )?guess|best guess|i(?:'d| would) (?:guess|say)|i think|i believe)"
    r"(?=\s+\w)(?!\s+(?:anything|anyone|anybody|anywhere|something|any\b|different|many|several|various))"
)
_YES_NO_OPENING = r"^(?:no|yes|nope|yeah|yep)\b"

_WHOLE = {
    "unknown",
    "n/a",
    "na",
    "unsure",
    "uncertain",
    "undetermined",
    "indeterminate",
    "no answer",
    "not known",
}

_STRONG_RE = re.compile("|".join(f"(?:{p})" for p in _STRONG))
_HEDGE_RE = re.compile("|".join(f"(?:{p})" for p in _HEDGE))
_ABSENCE_RE = re.compile("|".join(f"(?:{p})" for p in _ABSENCE))
_COMMIT_RE = re.compile(_COMMIT)
_YES_NO_RE = re.compile(_YES_NO_OPENING)
_EDGE_PUNCT = " \t\n.,;:!?\"'()[]*-"


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.translate(_APOSTROPHES).lower()).strip()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text)


_TEMPLATE_WORDS = tuple(_words(_clean(t)) for t in REFUSAL_TEMPLATES)


def _is_template_prefix(words: list[str]) -> bool:
    """A template cut short by max_new_tokens ("Sorry, I cannot answer this") is still a refusal."""
    if not words:
        return False
    for template in _TEMPLATE_WORDS:
        if words == template or (len(words) >= 3 and template[: len(words)] == words):
            return True
    return False


@functools.lru_cache(maxsize=65536)
def is_refusal(text: str) -> bool:
    """Whether a free-text response declines to answer (see the module docstring for the rules)."""
    cleaned = _clean(text)
    bare = cleaned.strip(_EDGE_PUNCT)
    if not bare:
        return False  # an empty generation is a failure to answer, scored as wrong, not a refusal
    if bare in _WHOLE or _is_template_prefix(_words(bare)):
        return True
    if _STRONG_RE.search(cleaned):
        return True
    if _HEDGE_RE.search(cleaned) and not _COMMIT_RE.search(cleaned):
        return True
    return bool(_ABSENCE_RE.search(cleaned)) and not _YES_NO_RE.search(bare)
