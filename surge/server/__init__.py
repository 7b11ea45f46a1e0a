"""OpenAI-compatible HTTP server: FastAPI app over the AsyncEngine, in one process."""
