"""OpenAI-compatible HTTP frontend for tritonserver's generate extension (the `ernie` backend)."""
