"""Answer parsing behind the shipped metric modules: VQA normalisation, yes/no readings, option letters.

Each reading follows the evaluation it stands for: the official VQA answer normalisation, LLaVA's POPE evaluation,
the MME tool, and the answer forms LLaVA's ScienceQA evaluation accepts (plus option texts, for MMBench).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The official table, less the entries that never fire on a lowercased word ("Im", "Ive", ...) or map a word to
# itself; its one reversed entry ("somebody'd" -> "somebodyd") is kept.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation: "Two dogs." -> "2 dogs", "a Dog" -> "dog", "dont" -> "don't".

    Newlines and tabs become spaces. Each punctuation mark is deleted where the answer has it next to a space (every
    mark is, once the answer has a comma between digits: "1,000" -> "1000"), otherwise it becomes a space
    ("left-hand" -> "left hand"); periods go unless they are decimal points. Then lowercase, number words up to ten
    -> digits, articles dropped, apostrophe-less contractions repaired.
    """
    raw = answer.replace("\n", " ").replace("\t", " ").strip()
    delete = _COMMA_BETWEEN_DIGITS.search(raw) is not None
    text = raw
    for mark in _PUNCTUATION:  # decided on the answer as given, not as already edited
        text = text.replace(mark, "" if delete or f"{mark} " in raw or f" {mark}" in raw else " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    words = (_NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def pope_yes_no(prediction: str) -> str:
    """LLaVA's POPE reading: "no" if the first sentence (text before the first "."; commas removed, split on spaces)
    has the word "no", "No" or "not", otherwise "yes". Case-sensitive like LLaVA's: "NO" and "Not" read yes."""
    words = prediction.split(".")[0].replace(",", "").split(" ")
    return "no" if {"no", "No", "not"}.intersection(words) else "yes"


def mme_yes_no(prediction: str) -> str | None:
    """The MME tool's reading (after lmms-eval's cleaning: lowercase, strip, periods removed): "yes"/"no" if that is
    the whole answer, else the first four characters decide, "yes" before "no" ("Not sure" -> no); None (wrong)
    when they hold neither."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else None


def yes_no_references(references: Sequence[str], benchmark: str) -> list[str]:
    """References lowercased and stripped, "yes" or "no" each; a clear error naming `benchmark` otherwise."""
    truth = [reference.strip().lower() for reference in references]
    if bad := sorted({answer for answer in truth if answer not in ("yes", "no")}):
        raise ValueError(f"{benchmark} references must be 'yes' or 'no' (any case), got {bad}.")
    return truth


_BARE_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:]?")  # the whole answer: "B", "b", "(B)", "B.", "B)"
_LEADING_LETTER = re.compile(r"\(([A-Z])\)|([A-Z])[.:)](?:\s|$)")  # "(B) cat", "B. cat", "B: cat", "B) cat"
_LETTER_AFTER_ANSWER = re.compile(r"(?i:answer(?: is)?)\s*:?\s*\(?([A-Z])\b")  # "The answer is B", "Answer: (B)"


def choice_letter(prediction: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter a free-form answer picks, or None when it cannot be told.

    In order: the answer is a letter ("B", "(B)", "B."); it starts with one ("(B) cat", "B. cat"; not "A cat"); it
    says "the answer is B" or "answer: B"; given the option texts, it is one of them or contains exactly one of them
    as whole words, case-insensitively ("it is a cat" picks "cat" from ["dog", "cat"]). With options, letters past
    the last option do not count.
    """
    letters = string.ascii_uppercase if options is None else string.ascii_uppercase[: len(options)]
    text = prediction.strip()
    match = _BARE_LETTER.fullmatch(text) or _LEADING_LETTER.match(text) or _LETTER_AFTER_ANSWER.search(text)
    if match:
        letter = next(group for group in match.groups() if group).upper()
        if letter in letters:
            return letter
    if not options:
        return None
    answer = " ".join(text.lower().rstrip(".").split())
    texts = [" ".join(option.lower().split()) for option in options]
    if answer in texts:
        return letters[texts.index(answer)]
    hits = [i for i, option in enumerate(texts) if option and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", answer)]
    return letters[hits[0]] if len(hits) == 1 else None


def check_lengths(**columns: Sequence | None) -> int:
    """The common length of the given columns (None ones skipped); a clear error if they differ or are empty."""
    lengths = {name: len(values) for name, values in columns.items() if values is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs differ in length: {lengths}; pass one entry per example to each.")
    length = next(iter(lengths.values()))
    if length == 0:
        raise ValueError("no predictions: pass at least one example.")
    return length
