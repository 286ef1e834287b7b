"""Generation engines: the interface the trainer talks to (base.py), the in-process transformers engine
(embedded.py) with its sampler (sampling.py), and the writing of checkpoint-named tensors into a transformers model
(hf_layout.py, shared with sglang/probe.py). Imports nothing at package level: sglang/ imports base.py from here."""
