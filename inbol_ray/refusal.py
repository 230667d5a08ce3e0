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

Some responses are refusals or answers depending on what was asked, so callers that know the question
pass it (`question=`); without it the detector judges the response alone:
- a counting ("how many dogs?") or existence ("is there a dog?") question is answered by an absence
  ("there are no dogs in the image" = 0 / no), whereas for "what color is the dog?" it rejects the premise;
- a yes/no or either/or question that names a property ("is the water clear?", "is the shirt too small or
  too big?") is answered by echoing it ("not clear", "too small"), unless the response adds that it cannot
  see ("too small to read").
Size and light words ("too small", "too dark") are a refusal only with a perception verb ("too small to
read") or an image/text subject ("the text is too small"): on their own they describe the object.
"""

from __future__ import annotations

import functools
import hashlib
import re

REFUSAL_DETECTOR_VERSION = "v2"
"""Bump whenever the detector's decisions change (a cue added or removed, a rule changed): cached graded
outputs (refused flags, conf, predictions) were computed with the old decisions and are stale after it."""

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
    r"(?:determine|tell|say|answer|know|identify|see|discern|confirm|verify|ascertain|read|judge|"
    r"make (?:it |that |this )?out|infer|deduce|recogni[sz]e|provide|help(?: you)? with|assist|view|access|"
    r"process|find|detect|locate|"
    r"count|distinguish|comment|guess|decide|specify|describe|analy[sz]e|interpret|speculate|perceive|"
    r"figure out|give (?:a|an|you))"
)
# "I can't say for sure, but ..." only hedges: it may still commit to a guess.
_NOT_SURE_TAIL = r"(?! for (?:sure|certain)| with (?:certainty|confidence)| exactly| precisely| 100)"
_PASSIVE = (
    r"(?:determined|seen|identified|answered|read|known|confirmed|told|inferred|discerned|made out|"
    r"ascertained|deduced|verified|counted|located|recogni[sz]ed|judged|said)"
)
_CANNOT = r"(?:can ?not|can'?t|could ?not|couldn'?t)"
_ADV = r"(?:\w+ly |really |just |even |still )?"
_DEGREE = r"(?:\w+ |\d+ ?% |\d+ percent ){0,2}"  # "not (completely|100%|100 percent) sure"
_INFO = r"(?:information|info|context|details?|evidence|clues?|data|visual (?:information|cues))"
_TEXTUAL = (
    rf"(?:{_IMG}|text|writing|print|font|words|letters|lettering|numbers|digits|characters|details|label|"
    r"resolution|lighting)"
)

_STRONG = [
    # first/second person or clause-initial inability; a third-person subject ("he cannot see") is an answer
    rf"(?:^|[,;:.!?]\s*|\b(?:i|we|one|you)\s+){_ADV}{_CANNOT}\s+{_ADV}{_VERB}\b{_NOT_SURE_TAIL}",
    rf"(?:^|\b(?:i|we)(?: am|'m| are|'re)?\s+){_ADV}(?:unable|not able) to\s+{_ADV}{_VERB}\b",
    rf"\b(?:impossible|(?:not|isn'?t|wasn'?t) possible|no way|no means|not be able)(?: for me)? to\s+"
    rf"{_ADV}{_VERB}\b",
    rf"\b{_CANNOT} be\s+{_ADV}{_PASSIVE}\b",
    r"\b(?:not possible|impossible) for me\b",
    r"\b(?:no|any) (?:way|means) (?:of|to) (?:know|tell|determin|say|confirm|verify|count|answer)",
    r"\bno (?:clear|clearer|good|better|unobstructed) view\b",
    # not knowing
    rf"\b(?:i|we)\s+(?:really\s+|honestly\s+|just\s+|simply\s+)?(?:don'?t|do not|wouldn'?t|would not)\s+"
    rf"know\b{_NOT_SURE_TAIL}",
    rf"^(?:don'?t|do not) know\b{_NOT_SURE_TAIL}",
    r"\bno (?:idea|clue)\b",
    r"\bnot a clue\b",
    r"\b(?:nobody|no one|no-one) (?:can|could) (?:\w+ly )?(?:tell|say|know|determine)\b",
    r"\b(?:i'?d|i would) (?:rather not|prefer not to) (?:guess|say|speculate|answer|comment)\b",
    r"\b(?:idk|dunno)\b",
    # not visible / not determinable
    r"\b(?:not|isn'?t|aren'?t|wasn'?t|weren'?t)\s+(?:\w+ly\s+)?(?:visible|shown|depicted|discernible|discernable|"
    r"legible|readable|identifiable|apparent|evident|mentioned|provided|specified|indicated|determinable|"
    r"answerable|knowable|captured)\b",
    rf"\bnot (?:present|included|available) (?:in|from) {_LOC}\b",
    r"\b(?:illegible|unreadable|indiscernible|indeterminable|undeterminable|unidentifiable|unanswerable|"
    r"unknowable)\b",
    r"\b(?:is|are|remains) unknown\b",
    r"\b(?:out of|outside) (?:the )?(?:frame|view)\b",
    # image quality
    r"\btoo (?:blurry|blurred|grainy|pixelated|low[- ]?(?:res|resolution|quality)|out of focus|obscured|"
    r"fuzzy|faint)\b",
    # "too small" alone describes the object ("the shirt is too small"); it is the image only with a
    # perception verb or an image/text subject
    r"\btoo (?:small|tiny|dark|dim|bright|far(?: away)?|distant|low|poor|bad|zoomed (?:in|out)|close up)"
    rf"(?: for me)? to (?:{_ADV}{_VERB}|be {_PASSIVE})\b",
    rf"\b{_IMG}(?: quality)?(?: is|'s)(?: very| quite| too| rather)? (?:poor|bad|blurry|blurred|dark|"
    r"out of focus|grainy|pixelated|fuzzy|obscured|low[- ](?:quality|resolution)|not clear|unclear)\b",
    rf"\b{_TEXTUAL}(?: is| are|'s) (?:too|very|much too) (?:small|tiny|dark|dim|far away|distant|faint|"
    r"low)\b",
    rf"\b(?:{_TEXTUAL}|number|name|part|answer|face)(?: is| are|'s) (?:\w+ly )?(?:cut off|cropped out)\b",
    r"\b(?:doesn'?t|does not|do not|don'?t) (?:allow|enable|permit|let) (?:me|us|one) to\b",
    r"\bnot (?:\w+ly )?(?:detailed|sharp|focused|zoomed in) enough\b",
    r"\b(?:my |the )?view (?:is|of [\w ]+ is) (?:\w+ly )?(?:obstructed|blocked)\b",
    r"\b(?:i|we) (?:can )?only see (?:a |the )?(?:part|portion|half|edge|corner|top|bottom) of\b",
    rf"\b{_IMG} isn'?t clear\b",
    # missing information
    r"\b(?:not enough|insufficient|lack of|lacks|lacking|without (?:more|further|additional|sufficient|enough|"
    rf"any))\s+(?:\w+\s+)?{_INFO}\b",
    rf"(?:\bnot|n't|\bwithout)\b[^.;!?]{{0,30}}\b(?:enough|sufficient|adequate) (?:\w+ )?{_INFO}\b",
    rf"\black(?:s|ing)? (?:the |any |sufficient |enough )?{_INFO}\b",
    rf"\b{_INFO} (?:is|are|isn'?t|aren'?t) (?:not )?(?:available|given|provided)\b",
    rf"\bno {_INFO} (?:in|from|about|on) {_LOC}",
    r"\bwithout (?:a |being able to )?(?:clearer|better|closer|higher)\b",
    r"\bneed (?:more|additional|further) (?:information|context|details?)\b",
    r"\bmore (?:information|context|details?) (?:is|are|would be) (?:needed|required|necessary)\b",
    r"\bbeyond (?:my|the) (?:\w+ )?(?:abilit|capabilit|knowledge|scope)",
    r"\b(?:i|we) (?:don'?t|do not) have (?:access to|the ability)\b",
    rf"\bnot something (?:i|we) (?:can|could) {_ADV}{_VERB}\b",
    rf"\bnothing (?:in {_LOC} )?(?:that )?(?:indicates|tells|suggests|reveals)\b",
    r"\b(?:please|could you|can you|would you) (?:\w+ )?(?:provide|upload|share|send)\b",
    # question does not fit the image
    rf"\b(?:doesn'?t|does not|do not|don'?t) (?:match|correspond to|relate to|pertain to|apply to) {_LOC}\b",
    r"\b(?:unrelated|irrelevant|not related|not relevant) to (?:the |this )?(?:image|picture|photo|content)\b",
    r"\bquestion (?:is|seems|appears)(?: to be)? (?:\w+ )?(?:unrelated|irrelevant|not related|not relevant)\b",
    r"\bquestion (?:doesn'?t|does not) (?:make sense|apply)\b",
    rf"\b{_IMG}\s+(?:does not|doesn'?t|did not|didn'?t)\s+(?:\w+ly\s+)?(?:provide|give|offer|reveal|specify|"
    r"say|tell)\b",
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
    r"(?:^|[,;:.!?] |\bi'?m |\bi am |\bwe'?re |\bwe are )(?:still |just |really |honestly )?"
    rf"not {_DEGREE}(?:sure|certain|confident)\b",
    rf"\b{_CANNOT}\s+{_ADV}(?:say|tell|know|determine|be {_DEGREE}(?:sure|certain))\b",
    r"\b(?:i|we)\s+(?:don'?t|do not)\s+know (?:for (?:sure|certain)|exactly)\b",
    r"(?:^|\bi'?m |\bi am |\bit is |\bit's )(?:\w+ )?(?:unsure|uncertain)\b",
    rf"\b(?:hard|difficult|tricky|not easy|tough)\s+to\s+{_ADV}(?:tell|say|determine|know|judge|see|make out|"
    r"be sure|read|identify|discern|count|distinguish|answer)\b",
    r"\bunclear\b",
    r"(?:\b(?:it|this|that|which)(?: is|'s) |^)not (?:\w+ly )?clear"
    r"(?:\s*[.!]*$|\s+(?:enough|from|in|what|whether|which|who|how|if|where|why|when))",
    r"\bnot (?:\w+ly )?clear (?:enough|from (?:the|this))\b",
]

_ABSENCE = [
    rf"\bthere(?: is| are|'s) no\b[^.]*\b(?:in|on) {_LOC}\b",
    r"\bthere(?: is| are|'s) no (?:\w+ )?(?:visible|shown)\b",
    rf"\bthere (?:isn'?t|aren'?t|is not|are not) (?:any|a|an)\b[^.]*\b(?:in|on) {_LOC}\b",
    r"\b(?:i|we) (?:don'?t|do not|can'?t|cannot|can not) (?:\w+ly )?see (?:any|a|an|the)\b",
    rf"\b{_IMG}\s+(?:does not|doesn'?t|did not|didn'?t)\s+(?:\w+ly\s+)?(?:show|contain|depict|include|have|display|"
    r"feature|indicate)\b",
]

# A hedge followed by a guess is an answer ("not sure, but probably a cat"); "could be anything" is not.
_COMMIT = (
    r"\b(?:probably|likely|looks like|look like|appears to be|seems to be|might be|may be|could be|maybe|"
    r"perhaps|possibly|my (?:best )?guess|best guess|i(?:'d| would) (?:guess|say)|i think|i believe)"
    r"(?=\s+\w)(?!\s+(?:anything|anyone|anybody|anywhere|something|any\b|different|many|several|various))|"
    # an estimate, or a "but" clause that states something ("hard to see, but it says stop")
    r"\b(?:about|around|approximately|roughly|at least) (?:\d|one|two|three|four|five|six|seven|eight|nine|"
    r"ten)|\bbut (?:it|they|he|she|this|that)(?:'s| is| are| says| reads| shows)\b"
    r"(?! (?:hard|difficult|tough|tricky|unclear|not|too|impossible|possible|blurry|unknown|anything|"
    r"something)\b)"
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
    "sorry",
    "i'm sorry",
    "i am sorry",
    "so sorry",
    "apologies",
    "my apologies",
    "who knows",
    "no information",
    "no info",
}

_STRONG_RE = re.compile("|".join(f"(?:{p})" for p in _STRONG))
_HEDGE_RE = re.compile("|".join(f"(?:{p})" for p in _HEDGE))
_ABSENCE_RE = re.compile("|".join(f"(?:{p})" for p in _ABSENCE))
_COMMIT_RE = re.compile(_COMMIT)
_YES_NO_RE = re.compile(_YES_NO_OPENING)

# Questions an absence answers: counting (zero) and existence (no).
_ABSENCE_ANSWERS_RE = re.compile(
    r"\bhow many\b|\b(?:what|what's|what is) (?:the )?(?:total )?number of\b|"
    r"(?:^|[.:?!] )(?:please )?count\b|"
    r"(?:^|[.:?!] )(?:is|are|was|were) there\b|(?:^|[.:?!] )(?:do|can|could) you see\b|"
    r"(?:^|[.:?!] )(?:is|are) (?:any|anyone|anybody|someone|somebody)\b|"
    rf"(?:^|[.:?!] )(?:does|do) (?:the |this )?{_IMG} (?:show|contain|have|include|depict|feature)\b"
)
# What an absence says in such an answer: cut out before the cues are read, so that "I can't see any
# dogs" is 0 while "I can't see any dogs, the image is too dark" is still a refusal.
_ZERO_RE = re.compile(
    r"(?:\bthere(?: is| are|'s| was| were) (?:no|not any)|"
    r"\bthere (?:isn'?t|aren'?t|is not|are not|wasn'?t|weren'?t) any|"
    r"\b(?:i|we) (?:don'?t|do not|can'?t|cannot|can not|couldn'?t|could not|didn'?t|did not) (?:\w+ly )?"
    r"(?:see|spot|find|notice|detect|count) any|"
    rf"\b{_IMG}\s+(?:does not|doesn'?t|did not|didn'?t)\s+(?:show|contain|depict|include|have|display|"
    r"feature) any|"
    rf"\bnot (?:present|included) (?:in|on) {_LOC})\b"
    # "there is no way to tell", "I can't see any details": absent means of answering, not absent things
    rf"(?! (?:way|means|{_INFO}|indication|telling|knowing|clear|clearer|good|better|enough|part)\b)"
)
_POLAR_RE = re.compile(r"(?:^|[.:?!] )(?:is|are|was|were|does|do|did|can|could|will|would|has|have|should)\b")
# Property words a yes/no question can ask about; echoed in the response they answer it.
_ECHO_WORDS = frozenset(
    {"clear", "visible", "blurry", "blurred", "dark", "small", "big", "legible", "readable", "bright", "far"}
    | {"obscured", "focus", "distant"}
)
_EDGE_PUNCT = " \t\n.,;:!?\"'()[]*-"
_QUOTED_RE = re.compile(r'"[^"]*"|\u201c[^\u201d]*\u201d')


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


def _in_context(cleaned: str, question: str) -> tuple[str, bool]:
    """The response with what the question makes an answer masked out, and whether absence answers it."""
    q = _clean(question)
    absence_answers = bool(_ABSENCE_ANSWERS_RE.search(q))
    if absence_answers:
        cleaned = _ZERO_RE.sub(" ", cleaned)
    if _POLAR_RE.search(q):
        for word in _ECHO_WORDS.intersection(_words(q)):
            # "too small to read" still says the model cannot see, whatever was asked
            cleaned = re.sub(rf"\b{word}\b(?!(?: enough)? (?:for me )?to \w)", "~", cleaned)
    return cleaned, absence_answers


@functools.lru_cache(maxsize=65536)
def is_refusal(text: str, *, question: str | None = None) -> bool:
    """Whether a free-text response declines to answer `question` (see the module docstring for the rules).

    Without the question, absences and property words are judged as if it asked something else.
    """
    cleaned = _clean(text)
    bare = cleaned.strip(_EDGE_PUNCT)
    if not bare:
        return False  # an empty generation is a failure to answer, scored as wrong, not a refusal
    if bare in _WHOLE or _is_template_prefix(_words(bare)):
        return True
    unquoted = _QUOTED_RE.sub(" ", cleaned)
    if unquoted.strip(_EDGE_PUNCT):
        cleaned = unquoted  # quoted text is the image's ('a sign that says "I don't know"'), not the model's
    absence_answers = False
    if question:
        cleaned, absence_answers = _in_context(cleaned, question)
    if _STRONG_RE.search(cleaned):
        return True
    if _HEDGE_RE.search(cleaned) and not _COMMIT_RE.search(cleaned):
        return True
    if absence_answers:
        return False
    return bool(_ABSENCE_RE.search(cleaned)) and not _YES_NO_RE.search(bare)
