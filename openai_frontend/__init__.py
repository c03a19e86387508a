"""OpenAI-compatible HTTP frontend for tritonserver's generate extension (the `ernie` backend)."""

__version__ = "0.1.0"  # pyproject.toml's; GET /version reports it, as vLLM reports its own
