"""digits: what batching buys a model whose call costs about as much for 1 input as for 32.

The `digits` example kind (examples/digits: a random forest trained at setup, one worker) under
16 concurrent /put's of digit PNGs, driven by wrk (C, one thread; its Lua script sends the
multipart bodies and reads `batchSize` out of every answer), batched (DIGITS_BATCH_SIZE=32)
against the same kind without batching (DIGITS_BATCH_SIZE=1), both servers up and their runs
alternating, so a slow spell of the machine hits both. Beside the throughputs and their ratio:
the setup time the answers report, the mean batch size (jobs per handler call, from the
answers), and the model alone (one predict_proba of 1 image and of 32), which bounds the gain.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from common import server, table

CLIENTS = 16
BATCHED, ALONE = 32, 1
BOUNDARY = "jobqueuebenchdigits"
LUA = r"""
local paths = {%(paths)s}
local bodies = {}
for i, path in ipairs(paths) do
  local file = assert(io.open(path, "rb"))
  local png = file:read("*a")
  file:close()
  bodies[i] = "--%(boundary)s\r\nContent-Disposition: form-data; name=\"jobType\"\r\n\r\n"
    .. "digits\r\n--%(boundary)s\r\nContent-Disposition: form-data; name=\"file\"; "
    .. "filename=\"digit.png\"\r\nContent-Type: image/png\r\n\r\n" .. png
    .. "\r\n--%(boundary)s--\r\n"
end
local headers = {["Content-Type"] = "multipart/form-data; boundary=%(boundary)s"}
local next_body = 0

request = function()
  next_body = next_body %% #bodies + 1
  return wrk.format("POST", "/put", headers, bodies[next_body])
end

-- Per thread, read back by done(): answers, the sum of 1 / batchSize (batches), failures.
answers, batches, failures = 0, 0, 0
response = function(status, headers, body)
  local size = status == 200 and body:match('"batchSize":(%%d+)')
  if size then
    answers = answers + 1
    batches = batches + 1 / tonumber(size)
  else
    failures = failures + 1
  end
end

local threads = {}
setup = function(thread) table.insert(threads, thread) end
done = function(summary, latency, requests)
  local a, b, f = 0, 0, 0
  for _, thread in ipairs(threads) do
    a = a + thread:get("answers")
    b = b + thread:get("batches")
    f = f + thread:get("failures")
  end
  io.write(string.format("digits answers %%d batches %%.3f failures %%d\n", a, b, f))
end
"""


def digit_pngs(folder: Path) -> list[Path]:
    """The last image of each digit of load_digits, dark on light, 8 times its size."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for digit in range(10):
        index = int(np.flatnonzero(digits.target == digit)[-1])
        grey = (255 - np.round(digits.images[index] * 255 / 16)).astype(np.uint8)
        image = Image.fromarray(grey).resize((64, 64), Image.Resampling.NEAREST)
        path = folder / f"digit-{digit}.png"
        image.save(path)
        paths.append(path)
    return paths


def wrk(url: str, script: Path, seconds: float) -> dict:
    """One wrk run of `script` against /put: requests/s, p50 ms and the answers' batches."""
    text = subprocess.run(["wrk", "-t1", f"-c{CLIENTS}", f"-d{max(1, round(seconds))}s",
                           "--latency", "-s", str(script), f"{url}/put"],
                          capture_output=True, text=True, check=True).stdout
    answers, batches, failures = re.search(
        r"digits answers (\d+) batches ([\d.]+) failures (\d+)", text).groups()
    if int(failures):
        raise RuntimeError(f"{failures} /put answers were not 200 with a batchSize:\n{text}")
    value, unit = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", text, re.M).groups()
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
            "p50": float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit],
            "mean_batch": int(answers) / max(float(batches), 1e-9)}


def first_answer(url: str, png: Path) -> dict:
    """One /put (the warm-up: the kind's setup may run at its first job); its answer's data."""
    with httpx.Client(base_url=url, timeout=120) as client:
        answer = client.post("/put", data={"jobType": "digits"},
                             files={"file": ("digit.png", png.read_bytes(), "image/png")})
        answer.raise_for_status()
        return answer.json()["data"]["result"]["data"]


def model_alone(pngs: list[Path]) -> tuple[float, float]:
    """Milliseconds of one predict_proba of 1 image and of 32, median of 50, in this process."""
    import jobqueue_digits

    model = jobqueue_digits.train(None).classifier
    rows = np.stack([jobqueue_digits.features(path) for path in pngs])
    batch = rows[np.arange(32) % len(rows)]

    def call(inputs: np.ndarray) -> float:
        started = time.perf_counter()
        model.predict_proba(inputs)
        return (time.perf_counter() - started) * 1000

    return (statistics.median(call(rows[:1]) for _ in range(50)),
            statistics.median(call(batch) for _ in range(50)))


def run(runs: int, seconds: float = 10) -> dict:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed; `make bench` installs it with apt-get")
    samples: dict[int, list[dict]] = {BATCHED: [], ALONE: []}
    setup_seconds: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="jobqueue-bench-digits-") as folder, \
            server({"DIGITS_BATCH_SIZE": str(BATCHED)}, kinds="digits",
                   max_uploads=4 * CLIENTS) as batched, \
            server({"DIGITS_BATCH_SIZE": str(ALONE)}, kinds="digits",
                   max_uploads=4 * CLIENTS) as alone:
        pngs = digit_pngs(Path(folder))
        script = Path(folder) / "digits.lua"
        script.write_text(LUA % {"paths": ", ".join(f'"{path}"' for path in pngs),
                                 "boundary": BOUNDARY})
        servers = {BATCHED: batched, ALONE: alone}
        for size, srv in servers.items():
            data = first_answer(srv.url, pngs[3])
            if data["digit"] != 3 or data["setupCount"] != 1:
                raise RuntimeError(f"DIGITS_BATCH_SIZE={size}: a wrong first answer {data}")
            setup_seconds[size] = data["setupSeconds"]
            wrk(srv.url, script, 1)  # warm up
        for _ in range(runs):
            for size, srv in servers.items():
                samples[size].append(wrk(srv.url, script, seconds))
        one, thirty_two = model_alone(pngs)  # the servers idle meanwhile
    med = {size: {key: statistics.median(s[key] for s in runs_)
                  for key in ("rps", "p50", "mean_batch")} for size, runs_ in samples.items()}
    ratio = med[BATCHED]["rps"] / med[ALONE]["rps"]
    rows = [[f"batched: DIGITS_BATCH_SIZE={BATCHED}", f"{med[BATCHED]['rps']:.0f}",
             f"{med[BATCHED]['p50']:.1f}", f"{med[BATCHED]['mean_batch']:.1f}",
             f"{setup_seconds[BATCHED]:.2f}"],
            [f"one job a call: DIGITS_BATCH_SIZE={ALONE}", f"{med[ALONE]['rps']:.0f}",
             f"{med[ALONE]['p50']:.1f}", f"{med[ALONE]['mean_batch']:.1f}",
             f"{setup_seconds[ALONE]:.2f}"]]
    text = table([f"digits: {CLIENTS} connections (wrk) of /put, one worker", "jobs/s",
                  "p50 ms", "mean batch size", "setup s (training)"], rows)
    text += "\n\n" + table(["digits ratio", "value", "target"],
                           [["batched / one job a call, jobs/s", f"**{ratio:.2f}**", "≥ 3"],
                            ["model alone: predict of 32 / of 1, ms",
                             f"{thirty_two:.2f} / {one:.2f}", ""]])
    return {"name": "digits", "text": text, "ratio": ratio,
            "mean_batch": med[BATCHED]["mean_batch"]}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--smoke", action="store_true", help="one run of 1 s")
    args = parser.parse_args()
    print((run(1, 1) if args.smoke else run(args.runs, args.seconds))["text"])
