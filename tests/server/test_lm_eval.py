"""lm-evaluation-harness, unpatched, against a real server process: `lm-eval run --model local-completions` on the
repository's two small tasks (bench/lm_eval_tasks). Each item's log-likelihoods and generations equal what our own
/score and /generate give, and so do the accuracies."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.serving_http import free_port, start_server
from tests.factories import save_bos_byte_tokenizer, save_bundle

pytest.importorskip("lm_eval")
ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "bench" / "lm_eval_tasks"
DEMO = ROOT / "demo" / "bundle"


def lm_eval(tmp_path: Path, port: int, model: str, tasks: list[str], *model_args: str) -> tuple[dict, dict]:
    """Run the lm-eval CLI offline; return (results by task, samples by task)."""
    args = ",".join([f"base_url=http://127.0.0.1:{port}/v1/completions", f"model={model}", "max_retries=1",
                     *model_args])
    out = tmp_path / "lm-eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds"),
           "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", args,
                          "--tasks", ",".join(tasks), "--include_path", str(TASKS), "--batch_size", "4",
                          "--output_path", str(out), "--log_samples"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {task: sorted((json.loads(line) for path in out.rglob(f"samples_{task}_*.jsonl")
                             for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
               for task in tasks}
    return results, samples


def docs(task: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{task}.jsonl").read_text().splitlines()]


def check_choice_task(base: str, task: str, results: dict, samples: list[dict]) -> None:
    """mhr_choice: each choice's log-likelihood equals /score's for " " + choice (lm-eval's target delimiter)."""
    items = docs("mhr_choice")
    scored = httpx.post(f"{base}/score", json={"task": task, "inputs": [d["question"] for d in items],
                                               "choices": [[" " + c for c in d["choices"]] for d in items]},
                        timeout=60).json()["results"]
    for item, ours, theirs in zip(items, scored, samples, strict=True):
        assert [float(ll) for ll, _ in theirs["filtered_resps"]] == pytest.approx(  # logged as strings
            [s["logprob_sum"] for s in ours["scores"]], abs=1e-3)
        assert theirs["acc"] == float(ours["best_index"] == item["label"])
    accuracy = sum(r["best_index"] == d["label"] for r, d in zip(scored, items, strict=True)) / len(items)
    assert results["mhr_choice"]["acc,none"] == pytest.approx(accuracy)


def check_generation_task(base: str, task: str, results: dict, samples: list[dict]) -> float:
    """mhr_reverse_upper: each generation equals /generate's (greedy, 12 tokens, stop at a newline)."""
    items = docs("mhr_reverse_upper")
    ours = httpx.post(f"{base}/generate", json={"task": task, "inputs": [d["input"] for d in items],
                                                "max_new_tokens": 12, "stop": ["\n"]}, timeout=60).json()["outputs"]
    assert [s["filtered_resps"][0] for s in samples] == [o["text"] for o in ours]
    accuracy = sum(o["text"] == d["target"] for o, d in zip(ours, items, strict=True)) / len(items)
    assert results["mhr_reverse_upper"]["exact_match,none"] == pytest.approx(accuracy)
    return accuracy


@pytest.mark.slow
def test_lm_eval_on_a_causal_model_equals_score_and_generate(tmp_path):
    """Token-id prompts (lm-eval's default): its tokenizer puts <s> first, so add_bos_token=True makes its prompts
    the ones /score and /generate read."""
    save_bundle(tmp_path, "llama", task_names=["alpha", "beta", "gamma"], printable=True)
    save_bos_byte_tokenizer(tmp_path / "model")
    port = free_port()
    server = start_server(tmp_path / "model", tmp_path / "inventory", tmp_path / "adapted", port, 1)
    try:
        results, samples = lm_eval(tmp_path, port, "beta", ["mhr_choice", "mhr_reverse_upper"],
                                   f"tokenizer={tmp_path / 'model'}", "tokenizer_backend=huggingface",
                                   "add_bos_token=True")
        base = f"http://127.0.0.1:{port}"
        check_choice_task(base, "beta", results, samples["mhr_choice"])
        check_generation_task(base, "beta", results, samples["mhr_reverse_upper"])
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_lm_eval_generation_on_the_demo_t5_equals_generate(tmp_path):
    """T5: text prompts (tokenized_requests=False), which the server tokenises as /generate does; a generate_until
    task only (a seq2seq prompt has no log-probabilities)."""
    port = free_port()
    server = start_server(DEMO / "model", DEMO / "inventory", tmp_path / "adapted", port, 1)
    try:
        results, samples = lm_eval(tmp_path, port, "reverse-upper", ["mhr_reverse_upper"],
                                   f"tokenizer={DEMO / 'model'}", "tokenizer_backend=huggingface",
                                   "tokenized_requests=False")
        accuracy = check_generation_task(f"http://127.0.0.1:{port}", "reverse-upper", results,
                                         samples["mhr_reverse_upper"])
        assert accuracy > 0.5  # the demo's task adapter really reverses and upper-cases
    finally:
        server.terminate()
        server.wait(timeout=30)
