"""schemathesis against /openapi.json of a real server: no unexpected 5xx, and every response
(status code, content type, body, headers) is one the schema documents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_server

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")


def test_openapi_schema_holds_under_generated_requests(tmp_path):
    # Short timeouts, so generated slow jobs end in documented 504s instead of waits.
    with run_server(tmp_path, message_timeout=0.5, pdf2image_timeout=1, video_timeout=1,
                    pdf2image_queue_size=5, video_queue_size=5) as server:
        schemathesis = Path(sys.executable).parent / "schemathesis"
        done = subprocess.run(
            [str(schemathesis), "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
             "run", f"{server.url}/openapi.json",
             "--max-examples", "10", "--phases", "examples,coverage,fuzzing",
             "--checks", CHECKS, "--generation-deterministic", "--workers", "2",
             "--request-timeout", "20",
             # Streams that run until the client leaves; tests/test_events.py and
             # test_preview.py cover them.
             "--exclude-path", "/events", "--exclude-path-regex", "preview"],
            cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
        assert "passed" in done.stdout
        assert "Traceback" not in server.log()
