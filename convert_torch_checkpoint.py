#!/usr/bin/env python
"""Convert Hugging Face sparse cross-encoders (e.g. webis/sparse-cross-encoder-4-512) to sce_jax, or export back.

The same command as `python -m sce_jax.convert` (installed as `sce-jax-convert`), kept for checkouts:

    python convert_torch_checkpoint.py webis/sparse-cross-encoder-4-512 models/sce-4-512
    python convert_torch_checkpoint.py --export models/sce-4-512 hf/sce-4-512

Run with --help for the options (attention-pattern overrides, position-table extension, an untrained head).
"""

from sce_jax.convert import cli

if __name__ == "__main__":
    cli()
