"""Serving a run: the OpenAI-compatible server (`prlhf serve`) and the export for engines that take prompt embeddings."""
