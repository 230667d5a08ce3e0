"""What a question refers to, read from its words alone: the text rules of the mismatch recipe.

Why a module of its own: these rules decide which questions may become unanswerable training rows and
which words an image must not mention (`inbol_ray.data.mismatch` explains the recipe); they are pure
functions of a row's text, tested on phrasings (tests/unit/test_mismatch.py) apart from the image index.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from inbol_ray.grading import answer_key
from inbol_ray.schema import ANSWERABLE, ANSWERS, CHOICES, METRIC, QUESTION

_DETERMINERS = {"the", "this", "that", "these", "those", "his", "her", "their", "its"}
_AUXILIARIES = {"is", "are", "was", "were", "am", "do", "does", "did", "can", "could", "will", "would",
                "should", "shall", "has", "have", "had", "may", "might", "must"}  # fmt: skip
# Words that end a noun phrase: what follows them is no longer the referent.
_FUNCTION = _DETERMINERS | _AUXILIARIES | {
    "a", "an", "and", "or", "but", "nor", "not", "no", "of", "in", "on", "at", "to", "for", "from", "with",
    "by", "about", "into", "onto", "over", "under", "above", "below", "behind", "near", "next", "beside",
    "between", "through", "across", "along", "around", "inside", "outside", "against", "like", "than",
    "as", "be", "been", "being", "it", "he", "she", "they", "we", "you", "i", "them", "there", "here",
    "what", "which", "who", "whom", "whose", "where", "when", "why", "how", "if", "so", "very", "too",
    "all", "any", "some", "each", "every", "both", "either", "neither", "up", "down", "out", "off", "s",
}  # fmt: skip
# Head words that name the picture, an attribute or a position, never a thing that could be missing.
_GENERIC = {
    "object", "thing", "item", "one", "picture", "image", "photo", "photograph", "pic", "scene", "view",
    "shot", "photographer", "weather", "time", "day", "season", "place", "location", "setting",
    "background", "foreground", "area", "room", "kind", "type", "sort", "color", "colour", "name", "number",
    "shape", "size", "left", "right", "side", "top", "bottom", "front", "back", "middle", "center", "centre",
    "way", "first", "last", "other", "same", "most", "main", "entire", "whole", "total", "answer", "question",
    "brand", "make", "model", "style", "material", "pattern", "breed", "species", "flavor", "flavour", "price",
    "age", "height", "temperature", "word", "text", "writing", "purpose", "reason", "meaning",
}  # fmt: skip
# -ing words that are nouns; any other -ing word is a verb and ends the phrase ("the man holding").
_ING_NOUNS = {"building", "ceiling", "painting", "clothing", "ring", "king", "wing", "string", "swing",
              "spring", "awning", "railing", "icing", "frosting", "topping", "bedding", "sibling"}  # fmt: skip
# Participles describe a referent, they are not one ("the photo taken", "the parked car"): skipped.
_PARTICIPLES = {"taken", "made", "shown", "seen", "done", "given", "held", "worn", "written", "drawn", "known",
                "built", "called", "named", "used", "located", "placed", "kept", "put", "set"}  # fmt: skip
_ED_NOUNS = {"speed", "steed", "tweed", "hundred", "breed", "seabed", "flowerbed", "sled", "shed"}
_NONE_ANSWERS = {"0", "no", "none", "nothing", "nobody", "no 1", "nowhere", "neither"}
_YES_NO = {"yes", "no"}
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


# --- words --------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-case words with possessives cut ("man's" -> "man"): the units every rule compares."""
    return [w.split("'")[0] for w in _WORD.findall(text.lower())]


def variants(word: str) -> set[str]:
    """The word and its plausible singulars ("buses" -> bus, "glasses" -> glass, "ponies" -> pony).

    Both sides of every comparison are expanded, so "bus" matches "buses" and "house" matches "houses";
    a spurious variant can only make an image look like it mentions more, which rejects it (safe side).
    """
    out = {word}
    if word.endswith("ies"):
        out.add(word[:-3] + "y")
    if word.endswith("es"):
        out.add(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        out.add(word[:-1])
    return {w for w in out if len(w) >= 3 or w == word}


def _phrase_after(tokens: Sequence[str], start: int, max_words: int = 4) -> list[str]:
    phrase = []
    for w in tokens[start : start + max_words]:
        if w in _FUNCTION or (w.endswith("ing") and w not in _ING_NOUNS):
            break
        phrase.append(w)
    return phrase


def _is_participle(word: str) -> bool:
    return word in _PARTICIPLES or (len(word) >= 5 and word.endswith("ed") and word not in _ED_NOUNS)


def _content(phrase: Iterable[str]) -> list[str]:
    return [w for w in phrase if not w.isdigit() and not _is_participle(w) and not (variants(w) & _GENERIC)]


def referent_terms(question: str) -> frozenset[str]:
    """Content words of the noun phrases after a determiner ("the red circle" -> {red, circle}).

    Without a parser this is a heuristic; when it misses a referent the question is not eligible (fewer
    rows), and when it keeps an extra word the image must lack that word too (fewer images): both err
    towards precision.
    """
    tokens = words(question)
    terms: list[str] = []
    for i, w in enumerate(tokens):
        if w in _DETERMINERS:
            terms += _content(_phrase_after(tokens, i + 1))
    return frozenset(terms)


def normalised(answers: Iterable[str]) -> list[str]:
    return [answer_key(str(a)) for a in answers]


def absence_proof(row: Mapping[str, Any]) -> frozenset[str]:
    """Words a row proves absent from its image, or empty: "How many X ...?" answered 0 (by most
    annotators), or "Is/Are there (a) X ...?" answered no."""
    tokens = words(row[QUESTION])
    answers = Counter(normalised(row[ANSWERS] or []))
    if not answers or not row[ANSWERABLE]:
        return frozenset()
    top = answers.most_common(1)[0][0]
    if tokens[:2] == ["how", "many"] and top in {"0", "none"}:
        return frozenset(_content(_phrase_after(tokens, 2)))
    if tokens[:2] in (["is", "there"], ["are", "there"]) and top == "no":
        rest = 3 if tokens[2:3] and tokens[2] in {"a", "an", "any", "some"} else 2
        return frozenset(_content(_phrase_after(tokens, rest)))
    return frozenset()


# --- which questions ------------------------------------------------------------------------------------


def exclusion_reason(row: Mapping[str, Any]) -> str | None:
    """Why an answerable training row cannot become a mismatched question (None: it can)."""
    if row[CHOICES] is not None or row[METRIC] == "mc_letter":
        return "multiple choice"
    tokens = words(row[QUESTION])
    answers = set(normalised(row[ANSWERS] or []))
    if (tokens and tokens[0] in _AUXILIARIES) or answers & _YES_NO:
        return "yes/no question"
    if "how many" in " ".join(tokens) or "how much" in " ".join(tokens):
        return "counting question"
    if answers & _NONE_ANSWERS:
        return "a gold answer means none"
    if not referent_terms(row[QUESTION]):
        return "no referring noun phrase"
    return None
