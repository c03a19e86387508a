"""Write an lm-evaluation-harness task for the demo model: its capitals as 4-way multiple choice.

Each question is scored by loglikelihood (`/v1/completions` with echo and logprobs): the prompt is the demo
model's chat format up to "The capital of X is", the choices are the right capital and three others.
Usage: python scripts/lm_eval_task.py OUT_DIR
  (then: lm_eval --include_path OUT_DIR --tasks ernie_demo_capitals ...; scripts/lm_eval_harness.sh does both)
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

from demo_corpus import CAPITALS

TASK = "ernie_demo_capitals"
# The demo chat template's rendering of one user turn with thinking off, then the start of the answer.
PROMPT = ("<|begin_of_sentence|>User: What is the capital of {{country}}?\\nAssistant: <think>\\n</think>\\n"
          "The capital of {{country}} is")


def write_task(out: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    capitals = [capital for _, capital, _, _ in CAPITALS]
    data = out / f"{TASK}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for country, capital, _, _ in CAPITALS:
            choices = [*rng.sample([c for c in capitals if c != capital], 3), capital]
            rng.shuffle(choices)
            row = {"country": country, "choices": choices, "label": choices.index(capital)}
            f.write(json.dumps(row) + "\n")
    config = out / f"{TASK}.yaml"
    config.write_text("\n".join([
        f"task: {TASK}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data.resolve()))}}}}}",
        "test_split: test",
        "output_type: multiple_choice",
        f'doc_to_text: "{PROMPT}"',
        'doc_to_choice: "{{choices}}"',
        "doc_to_target: label",
        'target_delimiter: " "',
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]",
        "",
    ]), encoding="utf-8")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lm_eval_task").info("task written: %s", write_task(args.out))


if __name__ == "__main__":
    main()
