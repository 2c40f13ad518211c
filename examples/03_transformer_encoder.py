"""Compress a transformer encoder (Hugging Face ``BertModel``) with tokenizer-style calibration batches.

The model is built from a small config with random weights (no download), so this shows the mechanics:
dict batches of keyword arguments, the fallback from torch.fx to swapping modules by name, the
attention/feed-forward Linear layers, and the output agreement measured against the original model.
Run:  python examples/03_transformer_encoder.py [--budget params=0.5]
"""

import argparse

import torch
from transformers import BertConfig, BertModel

import sketchpass as sp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="params=0.5")
    args = ap.parse_args()

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128)
    model = BertModel(config).eval()

    def batch(n=16, length=32):  # what a tokenizer returns: a dict of keyword arguments
        ids = torch.randint(0, config.vocab_size, (n, length))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    calib = [batch() for _ in range(8)]
    # embeddings are not Linear layers; compress the encoder's Linear layers and keep the pooler dense
    plan = sp.plan(model, args.budget, calib=calib, ignore=["pooler.*"])
    small = sp.apply(model, plan, calib=calib)
    print(small.sketchpass_plan.report())

    test = batch(32)
    with torch.no_grad():
        ref = model(**test).last_hidden_state
        out = small(**test).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1)).mean()
    rel = float((out - ref).square().sum() / ref.square().sum())
    print(f"held-out batch: mean cosine to the original hidden states {cos:.4f}, relative squared error {rel:.4f}")


if __name__ == "__main__":
    main()
