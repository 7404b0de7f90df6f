"""overhead: no-op message jobs through /put against GET /health, same server, same client."""

from __future__ import annotations

import asyncio
import time
from statistics import median

import httpx

from common import percentile, server, table

CLIENTS = (1, 16, 64)


async def load(url: str, clients: int, requests: int, put: bool) -> tuple[float, list[float]]:
    """`requests` calls spread over `clients` keep-alive connections: (requests/s, latencies)."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        async def one_client(count: int) -> None:
            for _ in range(count):
                started = time.perf_counter()
                if put:
                    response = await client.post("/put", json={"data": "", "seconds": 0})
                else:
                    response = await client.get("/health")
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one_client(requests // clients) for _ in range(clients)))
        return len(latencies) / (time.perf_counter() - started), latencies


def run(runs: int, requests: int = 2000) -> dict:
    """Per client count, `runs` rounds of /put then /health; medians of req/s, pooled latencies."""
    rows, ratios, added_p99 = [], {}, 0.0
    with server(message_queue_size=256) as srv:
        asyncio.run(load(srv.url, 4, 200, True))  # warm up
        for clients in CLIENTS:
            put_rps, health_rps, put_lat, health_lat = [], [], [], []
            for _ in range(runs):
                rps, latencies = asyncio.run(load(srv.url, clients, requests, True))
                put_rps.append(rps)
                put_lat += latencies
                rps, latencies = asyncio.run(load(srv.url, clients, requests, False))
                health_rps.append(rps)
                health_lat += latencies
            ratios[clients] = median(put_rps) / median(health_rps)
            p99_put, p99_health = percentile(put_lat, .99) * 1e3, percentile(health_lat, .99) * 1e3
            if clients == 1:
                added_p99 = p99_put - p99_health
            rows.append([clients, f"{median(put_rps):.0f}", f"{median(health_rps):.0f}",
                         f"{ratios[clients]:.2f}",
                         f"{percentile(put_lat, .5) * 1e3:.2f} / {p99_put:.2f}",
                         f"{percentile(health_lat, .5) * 1e3:.2f} / {p99_health:.2f}"])
    text = table(["clients", "/put no-op req/s", "/health req/s", "ratio (target ≥ 0.7 at 16)",
                  "/put p50 / p99 ms", "/health p50 / p99 ms"], rows)
    text += (f"\n\nAdded p99 at 1 client: {added_p99:.2f} ms (target ≤ 5 ms). The client is one "
             "Python process on the same 2 cores, so at 16 and 64 clients it limits both columns.")
    return {"name": "overhead", "text": text, "ratio": ratios[16], "added_p99_ms": added_p99}


if __name__ == "__main__":
    print(run(1)["text"])
