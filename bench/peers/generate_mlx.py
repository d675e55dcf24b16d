#!/usr/bin/env python3
"""Peer for `metal-candle bench generate`: mlx-lm (MLX, CUDA backend) greedy decoding with its
llama model and KV cache, random weights of the same config, bf16.

Batch 1 runs mlx-lm's own `generate_step` (prefill, then one token per step with the next
step's graph queued before the current token is read: `mx.async_eval`). Batch > 1 runs the same
loop written out for a batch of rows (mlx-lm's `generate_step` takes one prompt), with the same
pipelining.

Prefill tok/s = batch x prompt / time to the first token.
Decode tok/s  = batch x (new - 1) / (time from the first token to the last).
Median of --repeats runs after a warm-up run.

    python bench/peers/generate_mlx.py --config smollm2-135m --batch 1 --prompt 128 --new 128 --json
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.generate import generate_step
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from llama_configs import CONFIGS  # bench/peers/llama_configs.py, beside this script


def build(config, dtype):
    args = llama.ModelArgs(model_type="llama", **CONFIGS[config])
    model = llama.Model(args)
    # Random weights (mlx initialises every layer randomly; speed does not depend on them).
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    return model


def run_single(model, prompt, new):
    """mlx-lm's generate_step for one prompt; returns (prefill_s, decode_s)."""
    start = time.perf_counter()
    first = None
    count = 0
    for token, _ in generate_step(prompt[0], model, max_tokens=new):
        if isinstance(token, mx.array):
            token.item()
        count += 1
        if first is None:
            first = time.perf_counter()
        if count == new:
            break
    end = time.perf_counter()
    return first - start, end - first


def run_batch(model, prompt, new):
    """generate_step's loop for a batch of prompts (greedy, async pipelining)."""
    cache = make_prompt_cache(model)
    start = time.perf_counter()

    def step(tokens):
        logits = model(tokens, cache=cache)[:, -1, :]
        return mx.argmax(logits, axis=-1)

    y = step(prompt)
    mx.async_eval(y)
    first = None
    for n in range(new):
        if n + 1 < new:
            next_y = step(y[:, None])
            mx.async_eval(next_y)
        y.tolist()
        if first is None:
            first = time.perf_counter()
        if n + 1 < new:
            y = next_y
    end = time.perf_counter()
    return first - start, end - first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="smollm2-135m", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    mx.random.seed(0)
    dtype = {"bf16": mx.bfloat16, "f16": mx.float16, "f32": mx.float32}[args.dtype]
    model = build(args.config, dtype)
    prompt = mx.random.randint(0, CONFIGS[args.config]["vocab_size"], (args.batch, args.prompt))
    run = run_single if args.batch == 1 else run_batch
    run(model, prompt, 4)  # warm-up (kernel compilation)
    runs = [run(model, prompt, args.new) for _ in range(args.repeats)]
    prefill = statistics.median(args.batch * args.prompt / p for p, _ in runs)
    decode = statistics.median(args.batch * (args.new - 1) / d for _, d in runs)
    import mlx_lm

    out = {
        "impl": "mlx-lm", "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__},
        "config": args.config, "device": str(mx.default_device()), "dtype": args.dtype,
        "batch": args.batch, "prompt_tokens": args.prompt, "new_tokens": args.new,
        "prefill_tok_s": prefill, "decode_tok_s": decode,
        "loop": "mlx_lm.generate.generate_step" if args.batch == 1 else "generate_step's loop, batched",
    }
    print(json.dumps(out) if args.json else out)


if __name__ == "__main__":
    main()
