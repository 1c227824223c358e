"""Schemathesis against the live server's /openapi.json: no 5xx, every response (errors included)
conforms to the documented status codes, content types, headers and schemas, schema-violating
requests are rejected, auth is enforced.

`positive_data_acceptance` is left out on purpose: a schema-valid request may still name an
unknown model or carry text that is not a structure, which the server rightly rejects (422).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytest.importorskip("schemathesis")

from live_server import KEY, LiveServer  # noqa: E402


@pytest.mark.slow
def test_schemathesis_openapi_conformance(tmp_path):
    # queue only (workers=0): generated tasks that happen to be valid are stored, never computed
    srv = LiveServer(tmp_path, f"sqlite:///{tmp_path / 'schema.db'}", "--workers", "0", "--rate-limit", "0",
                     "--custom-models-dir", str(tmp_path / "models"))
    srv.start()
    try:
        cmd = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())", "run", f"{srv.url}/openapi.json",
               "-H", f"X-API-Key: {KEY}", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
               "--max-examples", "6", "--phases", "examples,coverage,fuzzing,stateful", "--workers", "2",
               "--seed", "1", "--request-timeout", "120",
               # POST /models/{name}/load really loads the model: SevenNet or CHGNet take > 10 s on a busy CPU
               "--max-response-time", "120",
               # SSE log streams (text/event-stream) run until their task ends or the client leaves
               "--exclude-path-regex", "/stream$"]
        for _attempt in range(2):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
            out = proc.stdout + proc.stderr
            # CPython 3.11.7's ast.parse can raise this SystemError inside hypothesis (it describes its own
            # strategies by parsing lambda sources) when threads recurse deeply: a tool crash, not an API
            # finding. Seen once in ~6 runs under load; run once more, and only for exactly that.
            if proc.returncode == 0 or "AST constructor recursion depth mismatch" not in out:
                break
        assert proc.returncode == 0, out[-6000:]
        assert "generated" in out and " passed" in out
        server_log = srv.log.read_text()
        errors = [line for line in server_log.splitlines()
                  if re.search(r" 5\d\d [0-9.]+ ms$", line) or line.startswith("Traceback")]
        assert not errors, "\n".join(errors[:20])
        # generated uploads are never valid models: every refused one must have left nothing behind
        models = tmp_path / "models"
        assert not models.exists() or not any(models.iterdir())
    finally:
        srv.stop()
