"""Prompt data: JSONL/Parquet prompt datasets and the resumable prompt loader (prompts.py), and the synthetic
tasks of the CPU example with their registered rewards (tasks.py)."""
