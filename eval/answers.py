"""Answer parsing behind the shipped metric modules, one reading per reference evaluator.

Each function ports the rules of the evaluator named in its docstring (repositories, files and commits are listed
in docs/evaluation.md): the official VQA evaluation (`vqaEval.py`), the EvalAI answer processor of LLaVA's
`m4c_evaluator.py`, LLaVA's GQA conversion, `eval_pope.py` and `eval_science_qa.py`, the MME tool's
`calculation.py`, and lmms-eval's readings of the same benchmarks (VQAv2, GQA, ScienceQA, MME, MMBench).
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
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")  # the official evaluation
_COMMAS_BETWEEN_DIGITS = re.compile(r"\d,+\d")  # EvalAI's processor (and lmms-eval, which reuses it)
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
# Both references pass re.UNICODE (= 32) where `sub` takes its count: only the first 32 such periods go.
_PERIODS_REMOVED = 32


def _one_line(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str, comma_runs: bool = False) -> str:
    """The official VQA answer normalisation: "Two dogs." -> "2 dogs", "a Dog" -> "dog", "dont" -> "don't".

    Newlines and tabs become spaces. Each punctuation mark is deleted where the answer has it next to a space (every
    mark is, once the answer has a comma between digits: "1,000" -> "1000"), otherwise it becomes a space
    ("left-hand" -> "left hand"); periods go unless a digit follows (the first 32 of them). Then lowercase, number
    words up to ten -> digits, articles dropped, apostrophe-less contractions repaired. `comma_runs`: EvalAI's
    variant, where a run of commas between digits ("1,,000") also counts (lmms-eval's VQAv2 scoring).
    """
    raw = _one_line(answer)
    digit_commas = _COMMAS_BETWEEN_DIGITS if comma_runs else _COMMA_BETWEEN_DIGITS
    delete = digit_commas.search(raw) is not None
    text = raw
    for mark in _PUNCTUATION:  # decided on the answer as given, not as already edited
        text = text.replace(mark, "" if delete or f"{mark} " in raw or f" {mark}" in raw else " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text, count=_PERIODS_REMOVED)
    words = (_NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def evalai_answer(answer: str) -> str:
    """The EvalAI answer processor of LLaVA's `m4c_evaluator.py` (TextVQA, and LLaVA-1.5's VQAv2/VizWiz uploads):
    lowercase, commas and "?" dropped, "'s" split off as a word ("what's" -> "what 's", "coca,cola" -> "cocacola"),
    then the official normalisation (`normalize_answer`)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return normalize_answer(text, comma_runs=True)


def official_vqa_answers(prediction: str, answers: Sequence[str]) -> tuple[str, list[str]]:
    """Prediction and annotator answers as the official `vqaEval.py` compares them: newlines and tabs to spaces and
    stripped; normalised (`normalize_answer`) only when the annotators do not all agree, so an answer all ten gave is
    matched exactly ("Yes" does not match ten "yes")."""
    prediction, answers = _one_line(prediction), [_one_line(answer) for answer in answers]
    if len(set(answers)) > 1:
        return normalize_answer(prediction), [normalize_answer(answer) for answer in answers]
    return prediction, answers


def gqa_llava_answer(prediction: str) -> str:
    """LLaVA-1.5's GQA prediction (`scripts/convert_gqa_for_eval.py`): trailing periods removed, lowercased; GQA's
    `eval.py` then compares it with the answer as it stands."""
    return prediction.rstrip(".").lower()


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def lmms_eval_exact_answer(text: str) -> str:
    """lmms-eval's `exact_match` with `ignore_case` and `ignore_punctuation` (its GQA task), applied to prediction
    and answer alike: lowercased, ASCII punctuation deleted ("t-shirt" -> "tshirt"), whitespace kept. Trailing NULs
    go, as in the NumPy string arrays it compares."""
    return text.rstrip("\x00").lower().translate(_NO_PUNCTUATION)


def pope_yes_no(prediction: str) -> str:
    """LLaVA's POPE reading: "no" if the first sentence (text before the first "."; commas removed, split on spaces)
    has the word "no", "No" or "not", otherwise "yes". Case-sensitive like LLaVA's: "NO" and "Not" read yes."""
    words = prediction.split(".")[0].replace(",", "").split(" ")
    return "no" if {"no", "No", "not"}.intersection(words) else "yes"


def mme_yes_no(prediction: str, scoring: str = "llava-1.5") -> str | None:
    """Yes/no as MME is scored; None (wrong) when neither.

    "llava-1.5", the MME tool's `calculation.py` (which LLaVA-1.5 ran): lowercased; "yes"/"no" if that is the whole
    answer, else the first four characters decide, "yes" before "no" ("Not sure" -> no, "y" and "n.o" -> None).
    "lmms-eval": lowercased, stripped and periods removed first ("n.o" -> no); a lone "y" / "n" reads yes / no.
    """
    if scoring == "lmms-eval":
        text = prediction.lower().strip().replace(".", "")
        if len(text) == 1:
            return {"y": "yes", "n": "no"}.get(text)
    else:
        text = prediction.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else None


_SCIENCEQA_LETTERS = ("A", "B", "C", "D", "E")
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z])[^\n]")


def scienceqa_letter(prediction: str, scoring: str = "llava-1.5") -> str | None:
    """The option letter a ScienceQA answer gives, or None (wrong).

    "llava-1.5" (LLaVA's `eval_science_qa.py`, case-sensitive, nothing stripped): the answer is one of "A"-"E"; or it
    starts with one of them and ". " ("B. dog"); or it holds "The answer is X" followed by one more character on the
    same line exactly once ("The answer is B." yes; "The answer is B", "(B)", "B) dog", "Answer: B", "b", "B." no).
    "lmms-eval" (its `scienceqa` task): stripped; a single letter in any case, or an uppercase letter followed by
    "." ("B.", "B.dog").
    """
    if scoring == "lmms-eval":
        text = prediction.strip()
        if len(text) == 1 or (len(text) >= 2 and text[0].isupper() and text[1] == "."):
            letter = text[0].lower()
            return letter.upper() if letter in string.ascii_lowercase else None
        return None
    if prediction in _SCIENCEQA_LETTERS:
        return prediction
    if len(prediction) >= 3 and prediction[0] in _SCIENCEQA_LETTERS and prediction[1:3] == ". ":
        return prediction[0]
    found = _THE_ANSWER_IS.findall(prediction)
    return found[0] if len(found) == 1 and found[0] in _SCIENCEQA_LETTERS else None


# lmms-eval's MMBench matcher (`mmbench_evals.py`): letters as words, then with these (prefix, suffix) around them.
_MMBENCH_LETTERS = "ABCDE"
_MMBENCH_AFFIXES = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                    (":", ","), (":", "."), (":", ")"), (":", ")."))
_API_FAILURE = "Failed to obtain answer via API"  # the matcher's sentinel for a failed judge call: never a letter


def _mmbench_option_letter(prediction: str) -> str | None:
    if _API_FAILURE in prediction:
        return None
    words = prediction.split()
    bare = [letter for letter in _MMBENCH_LETTERS if letter in words]
    if len(bare) == 1 and not (bare[0] == "A" and len(words) > 3):  # "A" in a longer answer may be the article
        return bare[0]
    for prefix, suffix in _MMBENCH_AFFIXES:
        hits = [letter for letter in _MMBENCH_LETTERS if f"{prefix}{letter}{suffix}" in words]
        if len(hits) == 1:
            return hits[0]
    return None


def _mmbench_text_letter(prediction: str, options: dict[str, str]) -> str | None:
    answer = prediction.lower()
    hits = [letter for letter, text in options.items() if text.lower() in answer]
    return hits[0] if len(hits) == 1 else None


# lmms-eval's static extraction (`_task_utils/mcq_extract.py`): answer phrases, and format priorities.
_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is", "best answer is",
    "the correct option is", "correct option is", "the best option is", "best option is", "the choice is",
    "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick", "my answer is",
    "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
_LETTER_FORMATS = (("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2))  # format, priority
_PHRASE, _START, _END = 7, 10, 9


def _extract_letter(prediction: str, letters: str) -> str | None:
    if not prediction.strip():
        return None
    text = prediction.strip()
    for mark in ",.!?;:'\"":
        text = text.strip(mark)
    text = f" {text} "
    found = []  # (priority, position, letter), in the order the reference collects them
    for pattern, priority in _LETTER_FORMATS:
        found += [(priority, text.rfind(pattern.format(c)), c) for c in letters if pattern.format(c) in text]
    lowered = text.lower()
    for phrase in _ANSWER_PHRASES:
        if (start := lowered.find(phrase)) != -1:
            positions = ((text.find(c, start + len(phrase)), c) for c in letters)
            found += [(_PHRASE, position, c) for position, c in positions if position != -1]
    core = text.strip()
    found += [(_START, 0, c) for c in letters if core.startswith(c) and (len(core) == 1 or not core[1].isalpha())]
    found += [(_END, len(text) - 1, c) for c in letters
              if core.endswith(c) and (len(core) == 1 or not core[-2].isalpha())]
    if not found:
        found = [(0, text.rfind(c), c) for c in letters if c in text]
    return max(found, key=lambda hit: hit[:2])[2] if found else None  # first of the best on ties, as the reference


def mmbench_letter(prediction: str, options: Sequence[str | None]) -> str | None:
    """The option letter lmms-eval's MMBench scoring reads from an answer (its `mmbench_en_dev_static` task: the
    rule-based matcher, then the static extractor instead of a GPT judge); None when it reads none.

    `options` are the texts of options A, B, C, D (None or NaN where the question has no such option). The answer is
    stripped. Matcher: exactly one of the words is a letter A-E ("Option B", "I think it is B"; but "A" not in an
    answer of more than three words); else exactly one word is a letter in one of the forms "B.", "B,", "B:", "B)",
    "B).", "(B)", "(B).", ":B", ":B,", ":B.", ":B)", ":B)." (tried in that order); else exactly one option's text is a
    substring of the answer, case-insensitively. Extractor, with the given options' letters: the best-ranked of a
    letter opening or closing the answer, following "the answer is" or a similar phrase, "(B)", "B.", "B:", "B)",
    "B " (the last one wins within a rank), else any occurrence of a letter.
    """
    prediction = prediction.strip()
    present = {letter: str(text) for letter, text in zip("ABCD", options) if text is not None and text == text}  # NaN
    letter = _mmbench_option_letter(prediction) or _mmbench_text_letter(prediction, present)
    return letter or _extract_letter(prediction, "".join(present) or "ABCDEFGH")


def yes_no_references(references: Sequence[str], benchmark: str) -> list[str]:
    """References lowercased and stripped, "yes" or "no" each; a clear error naming `benchmark` otherwise."""
    truth = [reference.strip().lower() for reference in references]
    if bad := sorted({answer for answer in truth if answer not in ("yes", "no")}):
        raise ValueError(f"{benchmark} references must be 'yes' or 'no' (any case), got {bad}.")
    return truth


def choice_references(references: Sequence[str], letters: str, benchmark: str) -> list[str]:
    """References uppercased and stripped, one of `letters` each; a clear error naming `benchmark` otherwise."""
    truth = [reference.strip().upper() for reference in references]
    if bad := sorted({letter for letter in truth if len(letter) != 1 or letter not in letters}):
        raise ValueError(f"{benchmark} references must be option letters ({letters}), got {bad}.")
    return truth


def check_scoring(scoring: str, supported: Sequence[str], metric: str) -> None:
    """A clear error if `scoring` is not one of the references `metric` ports."""
    if scoring not in supported:
        raise ValueError(f"{metric} has no scoring {scoring!r}; choose one of {list(supported)} (the reference "
                         "evaluators it ports, see docs/evaluation.md).")


def check_lengths(**columns: Sequence | None) -> int:
    """The common length of the given columns (None ones skipped); a clear error if they differ or are empty."""
    lengths = {name: len(values) for name, values in columns.items() if values is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs differ in length: {lengths}; pass one entry per example to each.")
    length = next(iter(lengths.values()))
    if length == 0:
        raise ValueError("no predictions: pass at least one example.")
    return length
