"""Case tables for each benchmark's metric, derived by reading the reference evaluator named in docs/evaluation.md
(repository, file, commit) and working each case through its rules: empty answers, extra words, punctuation, letters
in brackets, number words, unicode, several answers in one string. The comment on a case says which rule decides
it. Used by test_reference_scoring.py (asymoe's metrics) and test_lmms_eval_plugin.py (lmms-eval's own functions).
"""


def ten(answer: str) -> list[str]:
    return [answer] * 10


# VQAv2, "llava-1.5": the prediction goes through the EvalAI answer processor (LLaVA's submission script), then the
# official evaluation normalises both sides only when the ten annotators disagree. (prediction, answers, accuracy)
VQAV2 = [
    ("yes", ten("yes"), 1.0),
    ("Yes", ten("yes"), 1.0),  # the processor lowercases
    ("Yes.", ten("yes"), 1.0),
    ("", ten("yes"), 0.0),
    ("two", ten("2"), 1.0),  # number words -> digits
    ("Two dogs", ten("2 dogs"), 1.0),
    ("a dog", ten("dog"), 1.0),  # articles dropped
    ("t-shirt", ten("t-shirt"), 0.0),  # processed to "t shirt"; ten equal answers are compared unprocessed
    ("t-shirt", ["t-shirt"] * 9 + ["shirt"], 1.0),  # annotators disagree: answers normalised too
    ("what's", ten("whats"), 0.0),  # "what 's" against the raw "whats"
    ("whats", ten("what's"), 1.0),  # contraction repaired
    ("1,000", ten("1000"), 1.0),  # commas dropped
    ("coca,cola", ten("cocacola"), 1.0),
    ("red", ["red"] * 3 + ["blue"] * 7, 0.9),  # leave-one-out: (3 * 2/3 + 7 * 1) / 10
    ("red", ["red"] * 2 + ["blue"] * 8, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
    ("red", ["red"] + ["blue"] * 9, 0.3),  # (0 + 9 * 1/3) / 10
    ("blue and red", ten("red"), 0.0),  # several answers: no match
    ("Yes, it is", ten("yes"), 0.0),  # extra words
    ("3.5", ten("3.5"), 1.0),  # a decimal point stays
    ("none", ten("0"), 1.0),
    ("No", ["no"] * 5 + ["yes"] * 5, 1.0),
    ("café", ten("café"), 1.0),
    ("CAFÉ", ten("café"), 1.0),
    ("yes\nno", ten("yes no"), 1.0),  # newlines become spaces
    ("2 or 3", ten("2"), 0.0),
    ("left-hand", ["left hand"] * 5 + ["left"] * 5, 1.0),
    ("the cat's toy", ten("cat's toy"), 0.0),  # "'s" split off by the processor
    ("(1)", ten("1"), 1.0),  # brackets become spaces
    ("Ten.", ten("10"), 1.0),
]


# The options: "vqa" (the official evaluation on the raw prediction) and "lmms-eval" (its vqav2 task: the official
# normalisation, with EvalAI's comma rule, always on both sides). (prediction, answers, {scoring: accuracy})
VQAV2_OPTIONS = [
    ("Yes", ten("yes"), {"vqa": 0.0, "lmms-eval": 1.0}),  # raw: ten equal answers are matched exactly
    ("two", ten("2"), {"vqa": 0.0, "lmms-eval": 1.0}),
    ("two", ["2"] * 9 + ["3"], {"vqa": 1.0, "lmms-eval": 1.0}),  # disagreement: normalised
    ("t-shirt", ten("t-shirt"), {"vqa": 1.0, "lmms-eval": 1.0}),
    ("what's", ten("whats"), {"vqa": 0.0, "lmms-eval": 1.0}),  # lmms-eval repairs "whats" -> "what's"
    ("coca,cola", ten("cocacola"), {"vqa": 0.0, "lmms-eval": 0.0}),  # "," becomes a space
    ("1,,000", ["1000"] * 9 + ["1"], {"vqa": 0.0, "lmms-eval": 1.0}),  # a run of commas: EvalAI's rule deletes
    (" yes ", ten("yes"), {"vqa": 1.0, "lmms-eval": 1.0}),  # both strip
]


# TextVQA, "m4c" (LLaVA's m4c_evaluator.py): the EvalAI processor on the prediction and on every answer.
TEXTVQA = [
    ("what's", ten("whats"), 0.0),  # "what 's" against "what's"
    ("coca,cola", ten("cocacola"), 1.0),  # commas dropped
    ("Stop", ten("stop"), 1.0),
    ("STOP!", ten("stop"), 1.0),
    ("", ten("stop"), 0.0),
    ("t-shirt", ten("t-shirt"), 1.0),  # both sides processed alike
    ("acme", ["acme"] * 3 + ["acme inc"] * 7, 0.9),
    ("acme inc.", ["acme"] * 3 + ["acme inc"] * 7, 1.0),
    ("Acme, Inc.", ten("acme inc"), 1.0),
    ("what is it?", ten("what is it"), 1.0),  # "?" dropped
    ("john's", ten("johns"), 0.0),
    ("john's", ten("john's"), 1.0),
    ("1,000", ten("1000"), 1.0),
    ("1.000", ten("1000"), 0.0),  # a period before a digit stays
    ("two", ten("2"), 1.0),
    ("the end", ten("end"), 1.0),
    ("7up", ten("7 up"), 0.0),
    ("ÉCOLE", ten("école"), 1.0),
    ("stop stop", ten("stop"), 0.0),
    ("nokia", ["nokia"] * 2 + ["samsung"] * 8, 0.6),
    ("nokia", ["nokia"] + ["x"] * 9, 0.3),
    ("www.google.com", ten("www.google.com"), 1.0),
    ("B-52", ten("b 52"), 1.0),
    ("yes\tno", ten("yes no"), 1.0),
    ("it's a dog", ten("its a dog"), 0.0),
    ("dog's", ten("dogs"), 0.0),
    ("Coke?", ten("coke"), 1.0),
]


# VizWiz, "m4c" (lmms-eval's vizwiz_vqa, the processing LLaVA-1.5's VizWiz upload applies).
VIZWIZ = [
    ("unanswerable", ten("unanswerable"), 1.0),
    ("Unanswerable.", ten("unanswerable"), 1.0),
    ("unanswerable", ["unanswerable"] * 3 + ["unsuitable"] * 7, 0.9),
    ("unsuitable image", ten("unsuitable"), 0.0),
    ("I can't tell", ten("unanswerable"), 0.0),
    ("", ten("unanswerable"), 0.0),
    ("", ten(""), 1.0),  # an empty prediction matches empty answers
    ("Soup.", ["soup"] * 6 + ["tomato soup"] * 4, 1.0),
    ("tomato soup", ["soup"] * 6 + ["tomato soup"] * 4, 1.0),
    ("a can of soup", ["can of soup"] * 2 + ["soup"] * 8, 0.6),
    ("five dollars", ten("5 dollars"), 1.0),
    ("$5", ten("5 dollars"), 0.0),
    ("20", ten("twenty"), 0.0),  # only words up to ten become digits
    ("blue", ["blue"] + ["dark blue"] * 9, 0.3),
    ("dark-blue", ["dark blue"] * 10, 1.0),
    ("Coca-Cola", ten("coca cola"), 1.0),
    ("It's a bottle of water", ten("bottle of water"), 0.0),
    ("bottle of water", ten("bottle of water"), 1.0),
    ("grey", ten("gray"), 0.0),
    ("white/black", ten("white black"), 1.0),  # "/" becomes a space
    ("white / black", ten("white black"), 1.0),  # next to a space: deleted
    ("Señor Frog's", ten("señor frog's"), 1.0),
    ("no", ["no"] * 4 + ["yes"] * 6, 1.0),
    ("yes", ["no"] * 4 + ["yes"] * 6, 1.0),
    ("maybe", ["no"] * 4 + ["yes"] * 6, 0.0),
    ("remote", ["remote"] * 2 + ["tv remote"] * 2 + ["controller"] * 6, 0.6),
]


# GQA, "llava-1.5": trailing periods removed and lowercased (LLaVA's conversion), then GQA's eval.py compares with
# the answer as it stands. (prediction, answer, right)
GQA = [
    ("yes", "yes", 1),
    ("Yes", "yes", 1),
    ("Yes.", "yes", 1),
    ("Yes...", "yes", 1),
    (" yes", "yes", 0),  # nothing stripped
    ("yes ", "yes", 0),
    ("The man", "man", 0),  # no article removal
    ("man", "man", 1),
    ("t shirt", "t-shirt", 0),  # no punctuation handling
    ("T-Shirt", "t-shirt", 1),
    ("two", "2", 0),  # no number words
    ("", "no", 0),
    ("No!", "no", 0),
    ("no, it is not", "no", 0),
    ("left.", "left", 1),
    (".left", "left", 0),
    ("Left.\n", "left", 0),  # the newline keeps the period
    ("CAFÉ", "café", 1),
    ("yes.", "Yes", 0),  # the answer is not lowercased
    ("a dog", "dog", 0),
    ("dogs", "dog", 0),
    ("black and white", "black and white", 1),
    ("right/left", "right", 0),
    ("ÄPFEL", "äpfel", 1),
    ("yes.no", "yes.no", 1),
    ("3.5.", "3.5", 1),
]


# GQA, "lmms-eval": both sides lowercased and stripped of ASCII punctuation, whitespace kept.
GQA_LMMS_EVAL = [
    ("Yes!", "yes", 1),
    ("t shirt", "t-shirt", 0),
    ("T-shirt", "t-shirt", 1),
    (" yes", "yes", 0),
    ("The man", "man", 0),
    ("yes.", "Yes", 1),
    ("(left)", "left", 1),
    ("café!", "café", 1),
]


# ScienceQA, "llava-1.5" (LLaVA's eval_science_qa.py). (prediction, right letter, right)
SCIENCEQA = [
    ("B", "B", 1),
    ("A", "B", 0),
    ("b", "B", 0),  # case-sensitive
    ("(B)", "B", 0),
    ("B)", "B", 0),
    ("B) dog", "B", 0),
    ("B.", "B", 0),  # "X. " needs the space
    ("B. dog", "B", 1),
    ("B.dog", "B", 0),
    ("B. ", "B", 1),
    ("Answer: B", "B", 0),
    ("The answer is B", "B", 0),  # needs one more character
    ("The answer is B.", "B", 1),
    ("The answer is B, dog", "B", 1),
    ("The answer is Bob", "B", 1),
    ("the answer is B.", "B", 0),
    ("The answer is (B).", "B", 0),
    ("The answer is B. The answer is C.", "B", 0),  # two matches
    ("The answer is B. The answer is B.", "B", 0),
    ("dog", "B", 0),  # option text
    ("", "B", 0),
    (" B", "B", 0),  # nothing stripped
    ("B\n", "B", 0),
    ("E", "E", 1),
    ("C. cat", "B", 0),
    ("The answer is B\n", "B", 0),
    ("I think The answer is B.", "B", 1),
    ("BB", "B", 0),
    ("The answer is B.\nThe answer is C", "B", 1),  # the second has no character after the letter
    ("Ｂ", "B", 0),  # a full-width letter
]


# ScienceQA, "lmms-eval" (its scienceqa task): stripped; a letter in any case, or an uppercase letter and ".".
SCIENCEQA_LMMS_EVAL = [
    ("b", "B", 1),
    ("B.", "B", 1),
    ("B.dog", "B", 1),
    ("The answer is B.", "B", 0),
    (" B ", "B", 1),
    ("(B)", "B", 0),
    ("b.", "B", 0),
    ("B. dog", "B", 1),
    ("B dog", "B", 0),
]


# POPE, "llava-1.5" (LLaVA's eval_pope.py): "no" if the first sentence, commas removed and split on single spaces,
# has the word "no", "No" or "not". (prediction, how it reads)
POPE = [
    ("Yes", "yes"),
    ("No", "no"),
    ("no", "no"),
    ("NO", "yes"),  # case-sensitive
    ("Not", "yes"),
    ("not", "no"),
    ("No.", "no"),
    ("Yes, there is a dog.", "yes"),
    ("There is no dog.", "no"),
    ("There is a dog. No cat.", "yes"),  # first sentence only
    ("", "yes"),  # anything else reads yes
    ("no,", "no"),
    ("No,there is", "yes"),  # the comma is removed: "Nothere"
    ("no\nthere", "yes"),  # split on spaces only
    ("I do not think so", "no"),
    ("nothing", "yes"),
    ("Nope", "yes"),
    ("yes no", "no"),
    ("Yes. no", "yes"),
    ("It's not.", "no"),
    ("no!", "yes"),
    ("(no)", "yes"),
    ("Noo", "yes"),
    ("  no", "no"),
    ("cannot", "yes"),
    ("Yes\tno", "yes"),
]


# MME, "llava-1.5" (the MME tool's calculation.py): lowercased; "yes"/"no" if that is all, else the first four
# characters decide ("yes" first). (prediction, how it reads; None: neither, always wrong)
MME = [
    ("Yes", "yes"),
    ("No", "no"),
    ("yes.", "yes"),
    ("No.", "no"),
    ("y", None),
    ("n", None),
    ("n.o", None),
    ("Not sure", "no"),
    ("Nothing", "no"),
    ("Yes, it is", "yes"),
    ("It is yes", None),
    ("", None),
    ("YES", "yes"),
    (" yes", "yes"),
    ("  yes", None),  # "yes" is not within the first four characters
    ("yeah", None),
    ("nope", "no"),
    ("no yes", "no"),
    ("yes no", "yes"),
    ("know", "no"),
    ("snow", "no"),
    ("noyes", "no"),
    ("ÿes", None),
    ("No, there is not", "no"),
    ("Yes\nNo", "yes"),  # the tool's tab-separated file cannot hold a newline; the first four characters decide
    ("a yes", None),
    ("Y", None),
]


# MME, "lmms-eval" (its mme task): lowercased, stripped, periods removed first; a lone "y" / "n" is yes / no.
MME_LMMS_EVAL = [
    ("y", "yes"),
    ("n", "no"),
    ("n.o", "no"),
    ("Y.", "yes"),
    (" yes ", "yes"),
    ("  yes", "yes"),
    ("x", None),
    ("...", None),
    ("It is yes", None),
]


# MMBench, "lmms-eval" (mmbench_evals.py's matcher, then mcq_extract.py), options A cat, B dog, C bird, D fish.
# (prediction, right letter, right)
MMBENCH = [
    ("B", "B", 1),
    ("b", "B", 0),  # letters are uppercase only
    ("I think it is B.", "B", 1),
    ("Option B", "B", 1),
    ("B, because it barks", "B", 1),
    ("a dog", "B", 1),  # an option's text as a substring
    ("The dog", "B", 1),
    ("dogs", "B", 1),
    ("A dog", "B", 0),  # "A" as a word in a short answer is the letter A
    ("It is a dog, not a cat", "B", 0),  # two option texts; no letter to extract
    ("(B)", "B", 1),
    ("B)", "B", 1),
    ("(B).", "B", 1),
    ("Answer: B", "B", 1),
    ("B. dog", "B", 1),
    ("D", "B", 0),
    ("E", "B", 0),  # E is a letter the matcher reads, though there is no option E
    ("", "B", 0),
    ("A or B", "B", 0),  # the extractor prefers the opening letter
    ("The answer is B", "B", 1),
    ("I choose A, but B is also good", "B", 1),  # "B" is the only bare letter
    ("bird", "C", 1),
    ("Fish!", "D", 1),
    ("cat or dog", "B", 0),
    ("The correct answer is (B) dog", "B", 1),
    ("B\nC", "B", 1),  # two letters: the extractor takes the opening one
    ("  B  ", "B", 1),  # stripped first
]


# The project's tasks (grounding, easy-vqa): exact match after the official VQA normalisation of both sides.
# (prediction, accepted answers, right)
EXACT_MATCH = [
    ("red", ["red"], 1),
    ("Red.", ["red"], 1),
    ("a red", ["red"], 1),
    ("The Red", ["red"], 1),
    ("two", ["2"], 1),
    ("2", ["two"], 1),
    ("left-hand", ["left hand"], 1),
    ("1,000", ["1000"], 1),
    ("red and blue", ["red"], 0),
    ("", ["red"], 0),
    ("", [""], 1),
    ("reds", ["red"], 0),
    ("dont", ["don't"], 1),
    ("what's", ["whats"], 1),  # no "'s" split here: "whats" is repaired to "what's"
    ("circle!", ["circle"], 1),
    ("(circle)", ["circle"], 1),
    ("circle ?", ["circle"], 1),
    ("3.5", ["3.5"], 1),
    ("3.5", ["35"], 0),
    ("yes\nno", ["yes no"], 1),
    ("blue", ["green", "blue"], 1),
    ("BLUE", ["green", "blue"], 1),
    ("cyan", ["green", "blue"], 0),
    ("rouge", ["red"], 0),
    ("Ünïcode", ["ünïcode"], 1),
    ("ten", ["10"], 1),
    ("eleven", ["11"], 0),
]
