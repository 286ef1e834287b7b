#!/usr/bin/env python
"""Convert a megatron-core checkpoint written by this project back into a Hugging Face checkpoint.

python tools/convert_megatron_to_hf.py --megatron-path MCORE_DIR --output HF_DIR
The result (safetensors + config.json + tokenizer) loads with
transformers.AutoModelForCausalLM.from_pretrained(HF_DIR). Run under torchrun with --tp/--pp/--ep to
gather a model too large for one process. Nothing is written at --output unless the export succeeds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None):
    from grpo_megatron.parallel import add_layout_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-path", required=True, help="checkpoint from convert_hf_to_megatron.py or a run")
    parser.add_argument("--output", required=True, help="HF checkpoint directory to create")
    parser.add_argument("--dtype", default=None, help="dtype of the saved tensors (default: the checkpoint's)")
    add_layout_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from grpo_megatron.models import build_model, model_dims, save_hf_checkpoint
    from grpo_megatron.models.mcore_checkpoint import (
        HF_SUBDIR, dtype_from_name, load_mcore_checkpoint, read_checkpoint_config)
    from grpo_megatron.parallel import destroy, init_distributed, init_model_parallel, layout_from_args

    path = Path(args.megatron_path)
    hf_config, metadata = read_checkpoint_config(path)
    dtype = dtype_from_name(metadata["dtype"])
    layout = layout_from_args(args)
    rank, _ = init_distributed()
    try:
        init_model_parallel(layout, **model_dims(hf_config))
        model = build_model(hf_config, layout, dtype)
        load_mcore_checkpoint(model, path)
        save_hf_checkpoint(model, args.output, tokenizer_path=path / HF_SUBDIR,
                           dtype=dtype_from_name(args.dtype) if args.dtype else None)
        if rank == 0:
            print(f"wrote HF checkpoint {args.output}")
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
