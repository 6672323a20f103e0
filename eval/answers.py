"""Answer parsing shared by the metric modules and the task adapters: VQA normalisation, yes/no, option letters.

The VQA normalisation follows the official VQAv2 evaluation's rules (punctuation, periods, number words,
articles, contractions); the yes/no and option extraction follow what LLaVA's POPE, MME, ScienceQA and MMBench
evaluations accept from free-form answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Contractions written without their apostrophe → the canonical form (the official table's rule).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "im": "i'm", "Ive": "I've", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll",
    "its": "it's", "lets": "let's", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "shant": "shan't", "shed": "she'd", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "thered": "there'd", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "wed": "we'd", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # periods except decimal points


def normalize_answer(answer: str) -> str:
    """Official VQA answer normalisation: "Two dogs." -> "2 dogs", "a Dog" -> "dog", "dont" -> "don't"."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or _COMMA_BETWEEN_DIGITS.search(text):
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def yes_no(prediction: str) -> str:
    """POPE rule: the first sentence says "no" if it contains the word no/not, otherwise "yes"."""
    first = prediction.strip().split(".")[0].replace(",", " ")
    words = {word.lower() for word in first.split()}
    return "no" if words & {"no", "not"} else "yes"


def yes_no_strict(prediction: str) -> str | None:
    """MME rule: "yes"/"no" when the answer starts with it, otherwise None (counted wrong)."""
    head = prediction.strip().lower()
    for answer in ("yes", "no"):
        if re.match(rf"{answer}\b", head):
            return answer
    return None


_LETTER_AT_START = re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)")
_LETTER_AFTER_ANSWER = re.compile(r"answer is:?\s*\(?([A-Z])\)?(?:[.:)\s]|$)", re.IGNORECASE)


def choice_letter(prediction: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter a free-form answer picks: "B", "(B) ...", "B. ...", "The answer is B", or (given the
    options) the one option whose text the answer contains; None when it cannot be told."""
    text = prediction.strip()
    for pattern in (_LETTER_AT_START, _LETTER_AFTER_ANSWER):
        match = pattern.search(text)
        if match and (options is None or ord(match.group(1)) - ord("A") < len(options)):
            return match.group(1)
    if options:
        lowered = text.lower()
        hits = [i for i, option in enumerate(options) if option and option.strip().lower() in lowered]
        if len(hits) == 1:
            return chr(ord("A") + hits[0])
    return None


def check_lengths(**columns: Sequence) -> int:
    """The common length of the given non-None columns; a clear error if they differ or are empty."""
    lengths = {name: len(values) for name, values in columns.items() if values is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs differ in length: {lengths}; pass one entry per example to each.")
    length = next(iter(lengths.values()))
    if length == 0:
        raise ValueError("no predictions: pass at least one example.")
    return length
