"""Runs inside the vLLM virtual environment (see scripts/vllm_lane.py): greedy generation of a
job's prompts with vLLM's offline ``LLM``; writes token ids, per-token logprobs and timings.

    python vllm_worker.py JOB.json RESULT.json

JOB: {"models": [{"name", "path", "prompts": [{"text", "image"}], "max_tokens",
"ignore_eos", "repeats"}]}. vLLM runs in this one process (no engine subprocess) in fp32 on CPU.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process, ~25 s a model
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB


def main() -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    with open(sys.argv[1]) as f:
        job = json.load(f)
    results = {}
    for model in job["models"]:
        started = time.perf_counter()
        llm = LLM(
            model=model["path"],
            dtype="float32",
            enforce_eager=True,
            max_model_len=256,
            seed=0,
            limit_mm_per_prompt={"image": 1},
        )
        load_s = time.perf_counter() - started
        params = SamplingParams(
            temperature=0,
            max_tokens=model["max_tokens"],
            logprobs=0,
            ignore_eos=model.get("ignore_eos", False),
        )
        requests = [
            {"prompt": p["text"], "multi_modal_data": {"image": Image.open(p["image"]).copy()}}
            for p in model["prompts"]
        ]
        timings, outputs = [], None
        for _ in range(model.get("repeats", 1)):
            started = time.perf_counter()
            outputs = llm.generate(requests, params, use_tqdm=False)
            timings.append(time.perf_counter() - started)
        results[model["name"]] = {
            "load_seconds": load_s,
            "generate_seconds": timings,
            "prompts": [
                {
                    "prompt_ids": list(o.prompt_token_ids),
                    "tokens": list(o.outputs[0].token_ids),
                    "logprobs": [
                        step[token].logprob
                        for step, token in zip(
                            o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True
                        )
                    ],
                }
                for o in outputs
            ],
        }
        del llm
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
