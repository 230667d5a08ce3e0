"""Grading one response against gold answers: VQA soft accuracy, exact match, multiple-choice letters.

Confidence (conf = #correct / K) and every reported accuracy rest on these functions, so the VQA rules
follow the official evaluation script (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py)
to the character, quirks included. Two deliberate differences, both because our gold answers come from
several data sets and are not all pre-normalised the way VQAv2's annotation files are:
- gold answers are normalised exactly like the response (the official script only strips their
  punctuation, and only when the 10 answers are not unanimous); on VQAv2's own answers this changes
  nothing (tests check our scores equal the official loop on pre-normalised gold);
- lists that are not 10 answers long score min(#matches / 3, 1) instead of the 10-choose-9 average,
  which is only defined for 10 annotators. Note: a one-answer list therefore tops out at 1/3 - data sets
  with a single gold answer should use `exact`, not `vqa_soft`.
A refusal is never correct: grade() checks the refusal detector first.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

from inbol_ray.refusal import is_refusal

# --- official VQA answer processing -----------------------------------------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
"""The official table verbatim (its capitalised keys never match after lower-casing; kept as-is)."""

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
"""The official `manualMap`: note that "none" becomes "0" (a count answer), as in the official script."""

ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
"""Apostrophe and colon are kept ("girl's", "2:50"); the period has its own rule."""

# The official pattern is "(?!<=\d)(\.)(?!\d)": the first group is a look-ahead, not a look-behind, so
# the rule is "drop a period not followed by a digit" ("3.5" keeps it, "5." loses it). Kept verbatim.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_OFFICIAL_PERIOD_MAX = int(re.UNICODE)  # the script passes re.UNICODE (32) as sub()'s `count` argument


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: a mark touching a space, or any mark in a text with a digit,digit
    comma, is deleted; otherwise it becomes a space ("black-and-white" -> "black and white")."""
    out = text
    delete_all = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if delete_all or (mark + " " in text) or (" " + mark in text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, _OFFICIAL_PERIOD_MAX)


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower case, number words -> digits, drop articles, add apostrophes."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


@functools.lru_cache(maxsize=65536)
def normalize_answer(text: str) -> str:
    """The official response pipeline: whitespace, punctuation, then digits/articles/contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def answer_key(text: str) -> str:
    """The form two answers are compared in outside VQA soft accuracy: `normalize_answer`, except that an
    answer the article rule would erase keeps its lower-cased, punctuation-processed text.

    The official rules turn "A" (a multiple-choice letter) and "the" into "", so everything keyed on
    normalised text (construct's votes, exact match, agreement) dropped them: every gold-"A" item lost its
    answer. VQA soft accuracy keeps the official form, where "" == "" is what the official script scores.
    """
    key = normalize_answer(text)
    if key:
        return key
    return " ".join(process_punctuation(text.replace("\n", " ").replace("\t", " ")).lower().split())


def vqa_accuracy(response: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one response against the annotators' answers (duplicates kept).

    Ten answers: the mean over the 10 leave-one-out subsets of min(1, matches among the other 9 / 3),
    which is 0, .3, .6, .9, 1 for 0, 1, 2, 3, 4+ matching annotators. Other lengths: min(matches / 3, 1).
    """
    if len(answers) == 0:
        return 0.0
    target = normalize_answer(response)
    hits = [normalize_answer(answer) == target for answer in answers]
    matches = sum(hits)
    if len(answers) != 10:
        return min(matches / 3.0, 1.0)
    return sum(min(1.0, (matches - hit) / 3.0) for hit in hits) / len(answers)


# --- multiple choice --------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_WHOLE_LETTER = re.compile(r"^[\s(\[]*([A-Za-z])[\s)\].:]*$")
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.):])")
# A lower-case letter after the keyword counts only when bracketed or last ("the answer is a dog" is no "A").
_KEYWORD_LETTER = re.compile(
    r"\b(?i:answer|option|choice)(?i:\s+(?:is|would be|should be))?\s*:?\s*"
    r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])(?![A-Za-z'])|([a-z])(?=\s*[.!]?\s*$))"
)
_ANY_LETTER = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")


def _option_in_text(text: str, choices: Sequence[str]) -> int | None:
    """The option whose normalised text appears in the response; the longest wins, ties are no choice."""
    padded = f" {normalize_answer(text)} "
    found = [
        (len(norm), i)
        for i, option in enumerate(choices)
        if (norm := normalize_answer(option)) and f" {norm} " in padded
    ]
    if not found:
        return None
    found.sort(reverse=True)
    if len(found) > 1 and found[0][0] == found[1][0]:
        return None
    return found[0][1]


def choice_index(response: str, choices: Sequence[str] | None) -> int | None:
    """Which option a response picks, or None.

    Tried in order: the whole response is a letter ("B", "B.", "(B)"); it equals an option's text; it
    opens with a labelled letter ("B. cat", "(B) cat"); a keyword names a letter ("The answer is B",
    "Option C"); it contains exactly one option's text ("The answer is dog."); finally the first standalone
    capital letter, skipping "A"/"I" used as a word ("A dog is ...", "I think ..."). Letters beyond the
    number of options never count.
    """
    n = len(choices) if choices is not None else len(_LETTERS)

    def letter(char: str | None) -> int | None:
        if not char:
            return None
        index = _LETTERS.find(char.upper())
        return index if 0 <= index < n else None

    if (m := _WHOLE_LETTER.match(response)) and (index := letter(m.group(1))) is not None:
        return index
    if choices:
        norm = normalize_answer(response)
        for i, option in enumerate(choices):
            if norm and normalize_answer(option) == norm:
                return i
    if (m := _LEADING_LETTER.match(response)) and (
        index := letter(next(g for g in m.groups() if g))
    ) is not None:
        return index
    if (m := _KEYWORD_LETTER.search(response)) and (
        index := letter(next(g for g in m.groups() if g))
    ) is not None:
        return index
    if choices and (index := _option_in_text(response, choices)) is not None:
        return index
    for m in _ANY_LETTER.finditer(response):
        rest = response[m.end() : m.end() + 2]
        if m.group(1) in "AI" and len(rest) == 2 and rest[0] == " " and rest[1].islower():
            continue
        if (index := letter(m.group(1))) is not None:
            return index
    return None


def gold_indices(answers: Sequence[str], choices: Sequence[str] | None) -> set[int]:
    """Gold answers are letters ("B") or, in some loaders, the option text itself."""
    gold = set()
    for answer in answers:
        stripped = answer.strip().strip(".()")
        if len(stripped) == 1 and stripped.upper() in _LETTERS:
            gold.add(_LETTERS.index(stripped.upper()))
        elif choices:
            gold.update(
                i for i, option in enumerate(choices) if normalize_answer(option) == normalize_answer(answer)
            )
    return gold


def is_refusal_response(
    response: str,
    choices: Sequence[str] | None = None,
    *,
    refusal_option: bool,
    question: str | None = None,
) -> bool:
    """A refusal in free text, or - where the set offers one - picking an option that is itself a refusal.

    `refusal_option`: the item's options include a refusal *because the item is unanswerable by
    construction* (BeyondVisQA offers "Sorry, I can't help with it"; callers pass `not answerable`).
    Answering "E" then refuses even though the letter alone looks like an answer. Elsewhere a
    refusal-like option is an ordinary answer: MMBench, ScienceQA and MMMU have items whose correct
    option is "Cannot be determined" or "Not enough information", and picking it (by letter or by its
    text) is graded like any other option, +1 when right. `question`, when known, lets the detector read
    an absence as the answer to a counting question ("there are no dogs" = 0) rather than as a refusal.
    """
    index = choice_index(response, choices) if choices else None
    picks_refusal_option = index is not None and is_refusal(choices[index], question=question)
    if picks_refusal_option:
        return refusal_option
    return is_refusal(response, question=question)


# --- metrics ----------------------------------------------------------------------------------------


def _grade_vqa_soft(
    response: str, answers: Sequence[str], choices: Sequence[str] | None, correct_at: float
) -> bool:
    return vqa_accuracy(response, answers) >= correct_at


def _grade_exact(
    response: str, answers: Sequence[str], choices: Sequence[str] | None, correct_at: float
) -> bool:
    target = answer_key(response)
    return bool(target) and any(answer_key(answer) == target for answer in answers)


def _grade_mc_letter(
    response: str, answers: Sequence[str], choices: Sequence[str] | None, correct_at: float
) -> bool:
    index = choice_index(response, choices)
    return index is not None and index in gold_indices(answers, choices)


GRADERS: dict[str, Callable[[str, Sequence[str], Sequence[str] | None, float], bool]] = {
    "vqa_soft": _grade_vqa_soft,
    "exact": _grade_exact,
    "mc_letter": _grade_mc_letter,
}


def grade(
    response: str,
    answers: Sequence[str],
    metric: str,
    choices: Sequence[str] | None = None,
    *,
    correct_at: float = 0.5,
    question: str | None = None,
) -> bool:
    """Whether a response is correct under the item's metric; refusals are never correct.

    Only answerable items are graded, so a refusal-like option is an answer here (`is_refusal_response`).

    `correct_at` is the vqa_soft threshold (config `grading.vqa_correct_at`); other metrics ignore it.
    `question` is the item's question, passed to the refusal detector (see `is_refusal_response`).
    """
    grader = GRADERS.get(metric)
    if grader is None:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(GRADERS)}")
    if is_refusal_response(response, choices, refusal_option=False, question=question):
        return False
    return grader(response, answers, choices, correct_at)
