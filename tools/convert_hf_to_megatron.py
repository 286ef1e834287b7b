#!/usr/bin/env python
"""Convert a Hugging Face checkpoint into a megatron-core distributed (torch_dist) checkpoint.

Single process:   python tools/convert_hf_to_megatron.py --hf-path HF_DIR --output MCORE_DIR
Sharded layout:   torchrun --nproc-per-node 2 tools/convert_hf_to_megatron.py --hf-path HF_DIR \
                      --output MCORE_DIR --tp 2
The checkpoint loads at any other layout later (the layout here only decides how it is sharded
while converting, i.e. how much memory each process needs). Nothing is written at --output unless
the conversion succeeds.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    from grpo_megatron.parallel import add_layout_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-path", required=True, help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("--output", required=True, help="megatron checkpoint directory to create")
    parser.add_argument("--dtype", default="float32", help="parameter dtype: float32 | bfloat16 | float16")
    add_layout_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from grpo_megatron.models import build_model, load_hf_config, load_hf_weights, model_dims
    from grpo_megatron.models.mcore_checkpoint import dtype_from_name, save_mcore_checkpoint
    from grpo_megatron.parallel import destroy, init_distributed, init_model_parallel, layout_from_args

    hf_path = Path(args.hf_path)
    hf_config = load_hf_config(hf_path)  # validates the architecture before any process group exists
    layout = layout_from_args(args)
    dtype = dtype_from_name(args.dtype)
    rank, _ = init_distributed()
    try:
        init_model_parallel(layout, **model_dims(hf_config))
        model = build_model(hf_config, layout, dtype)
        load_hf_weights(model, hf_path)
        save_mcore_checkpoint(model, args.output, tokenizer_path=hf_path,
                              metadata={"source_hf_path": source_path(hf_path, Path(args.output))})
        if rank == 0:
            print(f"wrote megatron checkpoint {args.output} ({hf_config.model_type}, {args.dtype})")
    finally:
        destroy()
    return 0


def source_path(hf_path: Path, output: Path) -> str:
    """Where the weights came from, relative to the checkpoint: a checkpoint that is copied or committed
    does not carry an absolute path of the machine that converted it."""
    return os.path.relpath(hf_path.resolve(), output.resolve())


if __name__ == "__main__":
    sys.exit(main())
