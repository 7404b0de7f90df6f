"""The baseline for jobqueue's GET /health: a bare FastAPI app answering a small dict."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/health")
async def health() -> dict:
    return {"status": "ok", "queues": {"message": {"workers": 4, "queued": 0}}}
