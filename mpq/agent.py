"""``mpq agent``: time a trial's deployable model on a target that cannot run the full stack.

A robot computer may run neither Ray, MLflow nor torch. This module needs only the standard
library, numpy and onnxruntime: install it there with ``pip install --no-deps mpq`` and
``pip install numpy onnxruntime``, then::

    MPQ_AGENT_TOKEN=... python -m mpq.agent --port 8787       # 127.0.0.1 unless --host

A search names it as its latency target (``latency.agent: http://robot:8787``, the same token
in ``MPQ_AGENT_TOKEN``): each trial's ``model.onnx`` and the float model's are sent, and the
agent times them with the latency protocol (batch 1, fixed threads; ``visits`` pairs of fresh
sessions in a random order, ``runs`` calls each after ``warmup``; the speed-up is the
geometric mean of the per-pair ratios of medians, with its 95% Student-t interval) on its own
CPU, and answers the figures with its CPU's description.

Requests must carry ``Authorization: Bearer <token>`` (compared in constant time); the bodies
must be ONNX models ONNX Runtime can load (anything else is refused, and nothing sent is ever
written to disk or executed otherwise), at most ``MAX_BODY_BYTES``. One request is timed at
a time: two would disturb each other's figures.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import io
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

PROTOCOL = 1
MAX_BODY_BYTES = 1 << 30
TOKEN_ENV = "MPQ_AGENT_TOKEN"
# Student-t 97.5% quantiles (two-sided 95%) by degrees of freedom; 1.96 beyond the table
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    25: 2.060,
    30: 2.042,
}


def t975(df: int) -> float:
    """The Student-t 97.5% quantile for ``df`` degrees of freedom (the table's nearest lower
    entry past 20; 1.96 past 30), so the agent needs no scipy."""
    if df in _T975:
        return _T975[df]
    lower = [k for k in _T975 if k <= df]
    return _T975[max(lower)] if df <= 30 else 1.96


def cpu_description() -> str:
    """The CPU's model name, cores and architecture, as the agent's figures are of it."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}; {os.cpu_count()} cores; {platform.machine()}; {platform.system()}"


def _session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _visit(model: bytes, feeds: dict[str, Any], threads: int, warmup: int, runs: int) -> float:
    """A fresh session, ``warmup`` calls, then the median of ``runs`` timed calls (ms)."""
    session = _session(model, threads)
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def paired(
    reference: bytes,
    candidate: bytes,
    feeds: dict[str, Any],
    visits: int,
    runs: int,
    warmup: int,
    threads: int,
    seed: int = 0,
) -> dict[str, Any]:
    """The latency protocol on this CPU (module docstring): speed-up of ``candidate`` over
    ``reference`` with its 95% interval, and each one's latency (median of visit medians)."""
    rng = random.Random(seed)
    medians: dict[str, list[float]] = {"reference": [], "candidate": []}
    for _ in range(visits):
        order = [("reference", reference), ("candidate", candidate)]
        rng.shuffle(order)
        for name, model in order:
            medians[name].append(_visit(model, feeds, threads, warmup, runs))
    pairs = zip(medians["reference"], medians["candidate"], strict=True)
    logs = [math.log(f / c) for f, c in pairs]
    mean = statistics.fmean(logs)
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return {
        "speedup": math.exp(mean),
        "speedup_lo": math.exp(mean - half),
        "speedup_hi": math.exp(mean + half),
        "latency_ms": statistics.median(medians["candidate"]),
        "float_latency_ms": statistics.median(medians["reference"]),
        "visits": visits,
        "runs": runs,
        "threads": threads,
        "cpu": cpu_description(),
        "versions": _versions(),
    }


def _versions() -> str:
    import numpy
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}; numpy {numpy.__version__}; agent {PROTOCOL}"


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def authorized(token: str, authorization: str | None) -> bool:
    """The request's ``Authorization`` header is ``Bearer <token>`` (constant-time, on bytes:
    any header, ASCII or not, is compared, never raised on)."""
    given = (authorization or "").encode("utf-8", "replace")
    return hmac.compare_digest(f"Bearer {token}".encode(), given)


def handle(body: bytes, token: str, authorization: str | None) -> dict[str, Any]:
    """One timing request: checked (token, ONNX models, numbers) and timed.

    Raises:
        _Refused: with the HTTP status and a one-line reason.
    """
    if not authorized(token, authorization):
        raise _Refused(401, "missing or wrong token")
    try:
        req = json.loads(body)
        reference = base64.b64decode(req["reference"], validate=True)
        candidate = base64.b64decode(req["candidate"], validate=True)
        inputs = base64.b64decode(req["inputs"], validate=True)
        numbers = [int(req[k]) for k in ("visits", "runs", "warmup", "threads")]
    except (ValueError, KeyError, TypeError) as exc:
        raise _Refused(400, f"malformed request: {exc}") from None
    visits, runs, warmup, threads = numbers
    if not (2 <= visits <= 100 and 3 <= runs <= 100_000 and 0 <= warmup and 1 <= threads <= 256):
        raise _Refused(400, "visits, runs, warmup or threads out of range")
    import numpy as np

    try:
        with np.load(io.BytesIO(inputs), allow_pickle=False) as data:  # arrays only, no code
            feeds = {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise _Refused(400, f"inputs are not an .npz of arrays: {exc}") from None
    for name, model in (("reference", reference), ("candidate", candidate)):
        try:
            _session(model, 1)
        except Exception as exc:  # noqa: BLE001  whatever ONNX Runtime says about the bytes
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise _Refused(
                400, f"{name} is not an ONNX model ONNX Runtime loads: {text}"
            ) from None
    try:
        return paired(reference, candidate, feeds, visits, runs, warmup, threads)
    except Exception as exc:  # noqa: BLE001  inputs that do not fit, a failing run: one line
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else repr(exc)
        raise _Refused(422, f"timing failed: {text}") from None


def make_server(host: str, port: int, token: str) -> HTTPServer:
    """The agent's HTTP server (one request at a time), not yet serving."""

    class Handler(BaseHTTPRequestHandler):
        timeout = 60  # seconds a client may stall mid-request before it is dropped

        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            if self.path != "/v1/health":
                self._answer(404, {"error": "not found"})
                return
            self._answer(200, {"ok": True, "protocol": PROTOCOL})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/time":
                self._answer(404, {"error": "not found"})
                return
            if not authorized(token, self.headers.get("Authorization")):  # before any body
                self._answer(401, {"error": "missing or wrong token"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self._answer(400, {"error": "Content-Length is not a number"})
                return
            if length <= 0 or length > MAX_BODY_BYTES:
                self._answer(413, {"error": f"body of {length} bytes refused"})
                return
            body = self.rfile.read(length)
            try:
                self._answer(200, handle(body, token, self.headers.get("Authorization")))
            except _Refused as exc:
                self._answer(exc.status, {"error": str(exc)})

        def _answer(self, status: int, data: dict[str, Any]) -> None:
            payload = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            sys.stderr.write(f"mpq agent: {self.address_string()} {format % args}\n")

    return HTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mpq agent", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8787)
    args = p.parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "")
    if len(token) < 16:
        print(f"mpq agent: set {TOKEN_ENV} to a shared token of 16+ characters", file=sys.stderr)
        return 2
    server = make_server(args.host, args.port, token)
    print(
        f"mpq agent on http://{args.host}:{server.server_port} ({cpu_description()})", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
