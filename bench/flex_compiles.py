"""How often flex attention compiles as flat padding-free batches change length (CPU, forward).

    python bench/flex_compiles.py [--batches 8]

A small Llama with ``attn_implementation = "flex_attention"`` scores flat batches of 32 sequences
of random lengths, alternating train and eval mode as a run with an online reference does. Each
line: the batch's token count, its time, and dynamo's count of graphs compiled so far. The count
stops growing after the second batch (one static compile, then one with dynamic lengths), which
is why a run's compile cost is paid once per process and not per batch.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from dpo_hpc.algorithms.logprobs import model_inputs
from dpo_hpc.data.collate import pack_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096))
    model.set_attn_implementation("flex_attention")
    generator = torch.Generator().manual_seed(1)
    for i in range(args.batches):
        lengths = torch.randint(100, 600, (32,), generator=generator).tolist()
        rows = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in lengths]
        inputs = model_inputs(pack_rows(rows, [[1] * n for n in lengths], 0, flat=True))
        model.train(i % 2 == 1)
        started = time.perf_counter()
        with torch.no_grad():
            model(**inputs)
        print(f"batch {i} ({'train' if model.training else 'eval'} mode): {sum(lengths)} tokens, "
              f"{time.perf_counter() - started:.1f} s, graphs compiled so far: {counters['stats']['unique_graphs']}",
              flush=True)


if __name__ == "__main__":
    main()
