#!/usr/bin/env python3
"""PyTorch + PEFT peer of `metal-candle bench-train`: LoRA training tokens/s and peak memory.

Same work as the Rust side: a llama-family model with random weights built from a config
(SmolLM2-135M's or Llama-3.2-1B's), LoRA r=16 (alpha 32) on q,k,v,o,gate,up,down, batch x seq
random tokens, forward + causal-LM loss + backward + clip_grad_norm(1.0) + AdamW, bf16 autocast
with SDPA attention. Time: CUDA-synchronised wall clock per step, median of the timed steps
after warmup. Peak memory: torch.cuda.max_memory_allocated over the timed steps.

    python3 bench/peers/train_peft.py --config smollm2-135m --batch 8 --seq 512 --json out.json
"""
import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from llama_configs import CONFIGS  # bench/peers/llama_configs.py, beside this script


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="smollm2-135m", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"],
                    help="bf16: base weights in bf16 and bf16 autocast (adapters f32); f32: no autocast")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--json")
    args = ap.parse_args()

    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = LlamaConfig(**CONFIGS[args.config], attn_implementation=args.attn)
    model = LlamaForCausalLM(cfg)
    base_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model.to(device=dev, dtype=base_dtype)
    lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lcfg)
    for n, p in model.named_parameters():  # adapters in f32, as on the Rust side
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(dev)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    # Split at synchronisations after forward + loss and after backward, as the Rust side does.
    def step(phases=None):
        t0 = time.perf_counter()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = model(input_ids=ids, labels=ids)
        if phases is not None:
            sync()
            t1 = time.perf_counter()
        out.loss.backward()
        if phases is not None:
            sync()
            t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if phases is not None:
            sync()
            t3 = time.perf_counter()
            phases.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2))
        return out.loss

    for _ in range(args.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    phases = []
    for _ in range(args.steps):
        loss = step(phases)
    times = [p[0] for p in phases]
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
    res = {
        "bench": "lora_train_step", "impl": "pytorch+peft", "config": args.config, "device": args.device,
        "dtype": args.dtype, "attn": args.attn, "batch": args.batch, "seq": args.seq, "rank": args.rank,
        "steps": args.steps, "median_step_s": med,
        "median_forward_s": statistics.median(p[1] for p in phases),
        "median_backward_s": statistics.median(p[2] for p in phases),
        "median_optimizer_s": statistics.median(p[3] for p in phases), "tokens_per_s": args.batch * args.seq / med,
        "peak_memory_gib": peak / 2**30, "final_loss": float(loss),
        "torch": torch.__version__,
    }
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
