#!/usr/bin/env python3
"""Peer for `metal-candle bench embed`: sentence-transformers' encode (BERT -> mean pooling ->
Normalize) on the same sentences (bench/data/sentences.txt) and the same model folder.

--random-weights builds the model from the folder's config.json with random weights (speed does
not depend on them), so only config.json and tokenizer.json are needed; otherwise the folder's
model.safetensors is loaded. Sentences/s = sentences / median time of encode() over --repeats,
after a warm-up; encode returns host arrays, so the GPU work is finished when the clock stops.

    python bench/peers/embed_st.py --model DIR --random-weights --device cuda --batch-size 32 --json
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sentences", default=os.path.join(os.path.dirname(__file__), "..", "data", "sentences.txt"))
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import sentence_transformers
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    sentences = [l.rstrip("\n") for l in open(args.sentences, encoding="utf-8") if l.strip()]
    folder = args.model
    if args.random_weights:
        torch.manual_seed(0)
        folder = tempfile.mkdtemp()
        BertModel(BertConfig.from_pretrained(args.model), add_pooling_layer=False).save_pretrained(folder)
        for f in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]:
            if os.path.exists(os.path.join(args.model, f)):
                shutil.copy(os.path.join(args.model, f), folder)
    transformer = models.Transformer(folder, max_seq_length=256)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device=args.device)
    if args.dtype != "f32":
        model = model.to({"f16": torch.float16, "bf16": torch.bfloat16}[args.dtype])

    def run():
        t = time.perf_counter()
        v = model.encode(sentences, batch_size=args.batch_size, convert_to_numpy=True)
        assert v.shape[0] == len(sentences)
        return time.perf_counter() - t

    run()
    seconds = statistics.median(run() for _ in range(args.repeats))
    result = {
        "impl": "sentence-transformers",
        "versions": {"torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__},
        "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
        "sentences": len(sentences), "sentences_per_s": len(sentences) / seconds,
    }
    print(json.dumps(result) if args.json else f"{result['sentences_per_s']:.0f} sentences/s")


if __name__ == "__main__":
    main()
