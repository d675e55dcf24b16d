#!/usr/bin/env python3
"""Peer for `metal-candle bench generate`: Hugging Face transformers `generate` (greedy, KV
cache, SDPA attention) on a llama config with random weights, bf16.

Prefill tok/s = batch x prompt / time of generate(max_new_tokens=1).
Decode tok/s  = batch x (new - 1) / (time of generate(max_new_tokens=new) - prefill time).
Every timed region ends with torch.cuda.synchronize(); median of --repeats runs after a warm-up.

    python bench/peers/generate_hf.py --config smollm2-135m --batch 1 --prompt 128 --new 128 --json
"""

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_configs import CONFIGS  # bench/peers/llama_configs.py, beside this script


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="smollm2-135m", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    cfg = LlamaConfig(**CONFIGS[args.config], attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device=args.device)
    mask = torch.ones_like(ids)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(new):
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        sync()
        assert out.shape == (args.batch, args.prompt + new), out.shape
        return time.perf_counter() - t

    timed(2)  # warm-up: kernels, cuBLAS handles, caches
    prefill = statistics.median(timed(1) for _ in range(args.repeats))
    total = statistics.median(timed(args.new) for _ in range(args.repeats))
    result = {
        "impl": "transformers",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "config": args.config, "device": args.device, "dtype": args.dtype,
        "batch": args.batch, "prompt_tokens": args.prompt, "new_tokens": args.new,
        "prefill_tok_s": args.batch * args.prompt / prefill,
        "decode_tok_s": args.batch * (args.new - 1) / (total - prefill),
        "total_s": total,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.config} batch {args.batch}: prefill {result['prefill_tok_s']:.0f} tok/s, "
              f"decode {result['decode_tok_s']:.1f} tok/s")


if __name__ == "__main__":
    main()
