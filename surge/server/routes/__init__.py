"""The server's routes, one module per API; each gives `router(state) -> APIRouter`.

    completions.py    POST /v1/completions            (OpenAI, on surge/server/generation.py)
    chat.py           POST /v1/chat/completions       (OpenAI, on surge/server/generation.py)
    embeddings.py     POST /v1/embeddings             (OpenAI, the engine's pooled prefills)
    tokenize.py       POST /tokenize, /detokenize
    models.py         GET /v1/models; Triton's repository API /v2/repository/...
    kserve.py         the KServe v2 inference protocol (Triton's): /v2, /v2/health/..., /v2/models/...
    health.py         /health, /ready, /metrics
    dashboard.py      /dashboard, /dashboard/data
"""
