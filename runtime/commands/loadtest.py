"""`treespec loadtest`: concurrent streaming clients against a running `treespec serve`.

Why its own command: the serving promises (issue 17) are about load: total and per-request
tokens/s, time to first token and p50/p99 latency at 1, 8, 32 and 64 concurrent streams, for
speculative and plain decoding through the SAME server (the tree travels with each request:
`tree: "none"` is plain decoding, no tree field is the server's default tree), and every output
equal to the same request sent alone (lossless under batching).

The clients speak the front's generate_stream (SSE over HTTP/1.1 on loopback, one connection per
request): it is the front's checked path, and unlike the OpenAI chunks each event carries the
token ids, so outputs are compared token for token. Greedy decoding only (temperature 0): that is
what makes "equal to the lone request" a sharp check.

Order of work: the server is checked reachable; for each tree mode, a reference pass sends every
prompt of the mix alone; then each concurrency level runs `--warmup` requests per client (not
counted, outputs still checked) and then the measured requests (`--requests` per level, or
`--seconds`). Results: JSON + PNG (runtime/commands/loadtest_report.py).
"""
from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from treespec.errors import InputError
from treespec.runtime.commands.loadtest_report import (GaugeSampler, level_summary, plot, print_level, server_metrics,
                                                       write_json)
from treespec.runtime.prompts import BUNDLED_BENCH, read_prompts

DEFAULT_LEVELS = "1,8,32,64"
MAX_CLIENTS = 1024
MODEL = "treespec"


@dataclass
class Sample:
    """One request as a client saw it."""
    prompt: int  # index into the prompt mix
    start: float  # seconds since the level began
    ttft_s: float | None = None
    latency_s: float = 0.0
    ids: list[int] = field(default_factory=list)
    steps: int = 0
    error: str | None = None
    counted: bool = True  # False: a warm-up request
    matches: bool | None = None  # equal to the reference (the prompt sent alone)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP front (treespec serve --port)")
    p.add_argument("--metrics-url", help="Triton's metrics endpoint (default: the front's port + 2, /metrics)")
    p.add_argument("--levels", default=DEFAULT_LEVELS, help=f"concurrent clients per level (default {DEFAULT_LEVELS})")
    p.add_argument("--trees", default="default,none",
                   help="tree modes, compared through the same server: default (the server's tree), none "
                        "(plain decoding), or a preset name (default: default,none)")
    p.add_argument("--requests", type=int, help="measured requests per level (default: 2 per client, at least 8)")
    p.add_argument("--seconds", type=float, help="measure each level for this long instead of a request count")
    p.add_argument("--warmup", type=int, default=1, help="uncounted requests per client before each level")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request (greedy)")
    p.add_argument("--prompts", type=Path, default=BUNDLED_BENCH, help="JSONL prompt mix (default: the bench set)")
    p.add_argument("--num-prompts", type=int, help="use the first N prompts of the mix")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    p.add_argument("--out", type=Path, default=Path("loadtest"), help="output prefix: <out>.json and <out>.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--levels must be comma-separated integers, e.g. {DEFAULT_LEVELS}; got {text!r}") from None
    if not levels or any(not 1 <= n <= MAX_CLIENTS for n in levels):
        raise InputError(f"--levels must be integers in [1, {MAX_CLIENTS}], got {text!r}")
    return levels


def check_args(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    levels = parse_levels(args.levels)
    modes = [m.strip() for m in str(args.trees).split(",") if m.strip()]
    if not modes:
        raise InputError("--trees needs at least one mode (default, none or a preset name)")
    for name, value, low in (("--requests", args.requests, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--warmup", args.warmup, 0), ("--num-prompts", args.num_prompts, 1)):
        if value is not None and value < low:
            raise InputError(f"{name} must be at least {low}, got {value}")
    for name, value in (("--seconds", args.seconds), ("--timeout", args.timeout)):
        if value is not None and not value > 0:
            raise InputError(f"{name} must be positive, got {value}")
    if args.requests is not None and args.seconds is not None:
        raise InputError("give --requests or --seconds, not both")
    parts = urlsplit(args.url)
    if parts.scheme != "http" or not parts.hostname:
        raise InputError(f"--url must be an http://host:port URL, got {args.url!r}")
    return levels, modes


def check_server(url: str) -> None:
    """One clear error when nothing (or no ready treespec model) answers at url."""
    for path in ("/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        try:
            with urllib.request.urlopen(url + path, timeout=10) as r:
                if r.status == 200:
                    continue
        except urllib.error.HTTPError as exc:
            raise InputError(f"the server at {url} is not ready ({path} answered {exc.code}): "
                             "wait for treespec serve to print 'ready'") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InputError(f"no treespec server reachable at {url} ({reason}): start one with treespec serve "
                             "or pass --url") from None


# -- one request --------------------------------------------------------------------------------------
def request_body(prompt: Any, mode: str, max_tokens: int, timeout: float) -> bytes:
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                            "timeout": min(timeout, 600.0)}
    body["messages" if isinstance(prompt, list) else "text_input"] = prompt
    if mode != "default":
        body["tree"] = mode
    return json.dumps(body).encode()


def stream_one(url: str, body: bytes, sample: Sample, t_level: float, timeout: float) -> Sample:
    """POST generate_stream, read the SSE events until the stream ends; fills sample."""
    parts = urlsplit(url)
    t0 = time.perf_counter()
    sample.start = t0 - t_level
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("POST", f"/v2/models/{MODEL}/generate_stream", body=body,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            sample.error = f"HTTP {response.status}: {response.read()[:200].decode('utf-8', 'replace')}"
            return sample
        for line in response:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                sample.error = str(event["error"])[:200]
                break
            ids = event.get("output_ids", [])
            if ids and sample.ttft_s is None:
                sample.ttft_s = time.perf_counter() - t0
            sample.ids += ids
            sample.steps += 1
    except (OSError, http.client.HTTPException, ValueError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        conn.close()
        sample.latency_s = time.perf_counter() - t0
    if sample.error is None and not sample.ids:
        sample.error = "the stream ended without tokens"
    return sample


# -- a level: N clients -----------------------------------------------------------------------------
@dataclass
class Level:
    clients: int
    mode: str
    samples: list[Sample]
    wall_s: float


def run_level(args, prompts: list, mode: str, clients: int) -> Level:
    """`clients` threads, each sending one request after the other: `--warmup` uncounted ones, then
    counted ones until the level's quota (`--requests`) or its time (`--seconds`) is used up."""
    quota = args.requests if args.requests is not None else max(8, 2 * clients)
    lock = threading.Lock()
    samples: list[Sample] = []
    issued = [0]
    t_level = time.perf_counter()

    def go_on(n: int, measured_since: float | None) -> bool:
        if n < args.warmup:
            return True
        if args.seconds is not None:
            return measured_since is None or time.perf_counter() - measured_since < args.seconds
        with lock:
            issued[0] += 1
            return issued[0] <= quota

    def client(i: int) -> None:
        n, measured_since = 0, None
        while go_on(n, measured_since):
            counted = n >= args.warmup
            if counted and measured_since is None:
                measured_since = time.perf_counter()
            k = (i + n * clients) % len(prompts)  # clients start on different prompts of the mix
            sample = Sample(prompt=k, start=0.0, counted=counted)
            stream_one(args.url, request_body(prompts[k], mode, args.max_tokens, args.timeout), sample,
                       t_level, args.timeout)
            with lock:
                samples.append(sample)
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    rounds = args.warmup + 1 + (0 if args.seconds is not None else -(-quota // clients))
    limit = time.monotonic() + args.timeout * rounds + (args.seconds or 0)
    for t in threads:
        t.join(max(limit - time.monotonic(), 0.1))
    if any(t.is_alive() for t in threads):
        raise InputError(f"a client of the {clients}-stream level is stuck (more than --timeout per request)")
    return Level(clients, mode, samples, time.perf_counter() - t_level)


def reference_pass(args, prompts: list, mode: str) -> list[Sample]:
    """Every prompt of the mix sent alone: the outputs the loaded levels must reproduce."""
    out = []
    for k, prompt in enumerate(prompts):
        sample = Sample(prompt=k, start=0.0)
        out.append(stream_one(args.url, request_body(prompt, mode, args.max_tokens, args.timeout), sample,
                              time.perf_counter(), args.timeout))
    return out


def run(args: argparse.Namespace) -> int:
    levels, modes = check_args(args)
    prompts = read_prompts(args.prompts, args.num_prompts)
    check_server(args.url)
    metrics_url = args.metrics_url or f"http://{urlsplit(args.url).hostname}:{(urlsplit(args.url).port or 80) + 2}/metrics"
    result: dict[str, Any] = {"url": args.url, "levels": levels, "modes": modes, "max_tokens": args.max_tokens,
                              "prompts": str(args.prompts), "num_prompts": len(prompts), "results": [],
                              "reference": {}}
    bad = 0
    for mode in modes:
        reference = reference_pass(args, prompts, mode)
        failed = [s.error for s in reference if s.error]
        if failed:
            raise InputError(f"the reference pass ({mode}) failed: {failed[0]}")
        ref_ids = [s.ids for s in reference]
        alone_tok_s = sum(len(s.ids) for s in reference) / sum(s.latency_s for s in reference)
        result["reference"][mode] = {"tokens_per_s_alone": round(alone_tok_s, 2),
                                     "ids": ref_ids}
        print(f"[{mode}] reference pass: {len(prompts)} prompts alone, {alone_tok_s:.1f} tok/s", flush=True)
        for clients in levels:
            before = server_metrics(metrics_url)
            with GaugeSampler(metrics_url) as gauges:
                level = run_level(args, prompts, mode, clients)
            after = server_metrics(metrics_url)
            for s in level.samples:
                s.matches = s.error is None and s.ids == ref_ids[s.prompt]
            summary = {**level_summary(level.clients, mode, level.samples, before, after), **gauges.summary()}
            bad += summary["errors"] + summary["mismatches"]
            result["results"].append({**summary, "samples": [asdict(s) for s in level.samples]})
            print_level(summary)
            write_json(args.out, result)  # after every level: a run cut short still leaves its numbers
    out_json = write_json(args.out, result)
    print(f"wrote {out_json}")
    if not args.no_plot:
        print(f"wrote {plot(result, args.out)}")
    if bad:
        print(f"FAILED: {bad} request(s) failed or differed from the same request sent alone")
        return 1
    print("every output equals the same request sent alone")
    return 0
