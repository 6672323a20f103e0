"""The lmms-eval model plugin under the real lmms-eval (0.7.3 from the registry, installed without its dependency pins
beside the project's environment: tests/lmms_eval_requirements.txt): `lmms-eval --model asymoe` runs MME on a local
fixture offline, through the entry point asymoe registers; the lmms-eval readings of the case tables agree with
lmms-eval's own scoring functions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from asymoe import AsyMoEForConditionalGeneration
from asymoe.eval.generation import chat_prompts, generate_batch, model_inputs
from asymoe.eval.scoring import load_metric
from asymoe.tiny import build_tokenizer, tiny_config, tiny_processor

import reference_cases as tables
from fixtures_eval import write_fixtures

pytestmark = pytest.mark.slow
REQUIREMENTS = Path(__file__).with_name("lmms_eval_requirements.txt")


@pytest.fixture(scope="module")
def lmms_eval_path(tmp_path_factory) -> Path:
    """lmms-eval and what its CLI imports, in a folder put first on PYTHONPATH (the project's packages stay)."""
    target = tmp_path_factory.mktemp("lmms_eval")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    "-r", str(REQUIREMENTS)], check=True, timeout=900)
    return target


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny AsyMoE saved with its remote code, processor and chat template; the same model and processor in
    memory; the local fixture tasks."""
    root = tmp_path_factory.mktemp("lmms_eval_model")
    tokenizer = build_tokenizer("yes no is it red blue".split())
    torch.manual_seed(0)
    config = tiny_config(tokenizer)
    model, processor = AsyMoEForConditionalGeneration(config).eval(), tiny_processor(config, tokenizer)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root / "model", model, processor, write_fixtures(root / "data")


def run_python(lmms_eval_path: Path, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lmms_eval_path), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)


def test_lmms_eval_runs_mme_through_the_plugin(lmms_eval_path, checkpoint, tmp_path):
    model_dir, model, processor, data = checkpoint
    (tmp_path / "tasks").mkdir()
    # lmms-eval's own MME task (prompt, generation settings, scoring) on the local fixture.
    (tmp_path / "tasks" / "mme_local.yaml").write_text(
        f"include: {lmms_eval_path / 'lmms_eval' / 'tasks' / 'mme' / 'mme.yaml'}\ntask: asymoe_mme_local\n"
        f"dataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: {data['mme']}\n")
    command = [str(lmms_eval_path / "bin" / "lmms-eval"), "--model", "asymoe",
               "--model_args", f"pretrained={model_dir},trust_remote_code=True", "--tasks", "asymoe_mme_local",
               "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out"), "--log_samples",
               "--batch_size", "3", "--device", "cpu"]
    result = run_python(lmms_eval_path, command, tmp_path)
    outputs = sorted((tmp_path / "out").glob("*/*_results.json"))  # lmms-eval exits 0 on errors: check its files
    assert result.returncode == 0 and outputs, result.stdout[-3000:] + result.stderr[-3000:]
    score = json.loads(outputs[0].read_text())["results"]["asymoe_mme_local"]["mme_perception_score,none"]
    log = next((tmp_path / "out").glob("*/*_samples_*.jsonl"))
    samples = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda s: s["doc_id"])

    # The plugin answers as asymoe's own generation does (same prompts, images and settings).
    rows = datasets.Dataset.from_parquet(str(data["mme"]))
    assert [s["doc_id"] for s in samples] == list(range(len(rows)))
    answers = generate_batch(model, processor, [s["input"] for s in samples],
                             [[row["image"].convert("RGB")] for row in rows], max_new_tokens=16)
    assert [s["filtered_resps"] for s in samples] == answers
    # lmms-eval's MME score of those answers is asymoe's MME metric with lmms-eval's reading.
    ours = load_metric("mme").compute(predictions=answers, references=rows["answer"], question_ids=rows["question_id"],
                                      categories=rows["category"], scoring="lmms-eval")
    assert score == pytest.approx(ours["perception"])


LOGLIKELIHOOD = """
import json, sys
import datasets
from lmms_eval.api.instance import Instance
from asymoe.eval.lmms_eval_plugin import AsyMoELmms

model_dir, data, continuations = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
try:
    AsyMoELmms(pretrained=model_dir, trust_remote_code=True, dtype="fp8")
except ValueError as err:
    print("error:", err, file=sys.stderr)
lm = AsyMoELmms(pretrained=model_dir, trust_remote_code=True, device="cpu")
lm.task_dict = {"pope": {"test": datasets.Dataset.from_parquet(data)}}
requests = [Instance("loglikelihood", (doc["question"], text, lambda doc: [doc["image"]], i, "pope", "test"), i,
                     {"task": "pope", "doc_id": i, "repeats": 1})
            for i, doc in enumerate(lm.task_dict["pope"]["test"]) for text in continuations]
print(json.dumps(lm.loglikelihood(requests)))
"""


def test_loglikelihood(lmms_eval_path, checkpoint, tmp_path):
    """lmms-eval 0.7.3 turns loglikelihood results into strings before its tasks read them (api/instance.py), so no
    loglikelihood task runs end to end there; the method is checked against the model's own loss and generate."""
    model_dir, model, processor, data = checkpoint
    continuations = [" yes", " no"]
    result = run_python(lmms_eval_path, [sys.executable, "-c", LOGLIKELIHOOD, str(model_dir), str(data["pope"]),
                                         json.dumps(continuations)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dtype=fp8: choose one of ['bf16', 'fp16', 'fp32']" in result.stderr
    scores = iter(json.loads(result.stdout.strip().splitlines()[-1]))
    greedy = []
    for row in datasets.Dataset.from_parquet(str(data["pope"])):
        images = [[row["image"].convert("RGB")]]
        prefix = chat_prompts(processor, [row["question"]], images)[0]
        prefix_length = model_inputs(model, processor, [prefix], images)["input_ids"].shape[1]
        with torch.no_grad():
            first = model.generate(**model_inputs(model, processor, [prefix], images), max_new_tokens=1,
                                   do_sample=False)[0, -1].item()
        for continuation in continuations:
            log_prob, is_greedy = next(scores)
            inputs = model_inputs(model, processor, [prefix + continuation], images)
            labels = inputs["input_ids"].clone()
            labels[:, :prefix_length] = -100  # one token: the word
            with torch.no_grad():
                loss = model(**inputs, labels=labels).loss  # its negative log-likelihood
            assert log_prob == pytest.approx(-loss.item(), rel=1e-4)
            assert is_greedy == (first == processor.tokenizer.convert_tokens_to_ids(continuation.strip()))
            greedy.append(is_greedy)
    assert not all(greedy)  # of " yes" and " no", at most one is the greedy next word


LMMS_EVAL_READINGS = """
import json, sys
from lmms_eval.api.metrics import exact_match_hf_evaluate
from lmms_eval.tasks.mme.utils import parse_pred_ans
from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator
from lmms_eval.tasks.scienceqa.utils import sqa_process_results
from lmms_eval.tasks.textvqa.utils import textvqa_process_results
from lmms_eval.tasks.vizwiz_vqa.utils import vizwiz_vqa_process_results
from lmms_eval.tasks.vqav2.utils import vqav2_process_results

cases = json.loads(sys.stdin.read())
def vqa(process, prediction, answers, dicts):
    if dicts:  # VQAv2's answers carry ids
        answers = [{"answer": answer, "answer_id": i} for i, answer in enumerate(answers)]
    doc = {"question_id": 1, "answers": answers}
    return process(doc, [prediction])["exact_match"]
def mmbench(prediction, letter):
    row = {"index": 7, "question": "q", "answer": letter, "prediction": prediction.strip(), "hint": None,
           "source": "s", "split": "dev", "category": "c", "L2-category": "l", "A": "cat", "B": "dog", "C": "bird",
           "D": "fish"}
    return MMBench_Evaluator().eval_result([row], eval_method="static")[0]
print(json.dumps({
    "vqav2": [vqa(vqav2_process_results, p, a, True) for p, a, _ in cases["vqav2"]],
    "textvqa": [vqa(textvqa_process_results, p, a, False) for p, a, _ in cases["textvqa"]],
    "vizwiz": [vqa(vizwiz_vqa_process_results, p, a, False) for p, a, _ in cases["vizwiz"]],
    "gqa": [float(exact_match_hf_evaluate([p], [a], ignore_case=True, ignore_punctuation=True)["exact_match"])
            for p, a, _ in cases["gqa"]],
    "scienceqa": [sqa_process_results({"choices": list("ABCDE"), "answer": "ABCDE".index(t)}, [p])["exact_match"]
                  for p, t, _ in cases["scienceqa"]],
    "mme": [{"other": None}.get(parse_pred_ans(p), parse_pred_ans(p)) for p, _ in cases["mme"]],
    "mmbench": [float(mmbench(p, t)) for p, t, _ in cases["mmbench"]],
}))
"""


def test_lmms_eval_readings_match_lmms_eval(lmms_eval_path, tmp_path):
    """The case tables' lmms-eval expectations are what lmms-eval's own functions give."""
    cases = {"vqav2": [(p, a, e["lmms-eval"]) for p, a, e in tables.VQAV2_OPTIONS], "textvqa": tables.TEXTVQA,
             "vizwiz": tables.VIZWIZ, "gqa": tables.GQA_LMMS_EVAL, "scienceqa": tables.SCIENCEQA_LMMS_EVAL,
             "mme": tables.MME_LMMS_EVAL, "mmbench": tables.MMBENCH}
    env = {**os.environ, "PYTHONPATH": str(lmms_eval_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", LMMS_EVAL_READINGS], input=json.dumps(cases), env=env,
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    given = json.loads(result.stdout.strip().splitlines()[-1])
    assert given.pop("mme") == [reading for _, reading in cases.pop("mme")]
    for name, rows in cases.items():
        assert given[name] == pytest.approx([row[-1] for row in rows]), name
