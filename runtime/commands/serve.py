"""`treespec serve`: the artifacts behind a real Triton Inference Server, until Ctrl-C / SIGTERM.

This command is where the two wings meet: it writes (or reuses) the model repository with the
exporter (treespec.exporter.triton_repo), then runs the service of runtime/triton/service.py
(tritonserver, its supervisor and the HTTP front) on 127.0.0.1, prints the endpoints and what the
supervisor does, and stops everything in order. The service survives its clients: tritonserver is
restarted if it dies, a dead or stuck model instance is replaced, and hostile requests get 4xx.
"""
from __future__ import annotations

import argparse
import signal
from pathlib import Path

from treespec.artifacts import load_manifest
from treespec.errors import InputError
from treespec.exporter.triton_repo import BACKENDS, cache_root, default_repo_dir, ensure_triton_repo
from treespec.runtime.triton.openai import OpenAIOptions
from treespec.runtime.triton.schema import MAX_BODY_BYTES
from treespec.runtime.triton.service import TritonService


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", required=True, type=Path, help="artifact directory from treespec-export")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--repo", type=Path, help="model repository to write or reuse (default: a cache folder)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="how the model runs the graphs: torch is the fastest on CUDA (it runs on the CPU too)")
    p.add_argument("--served-model-name", default="treespec",
                   help="the model name OpenAI clients send (/v1/models lists it; default treespec)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--instances", type=int, default=1,
                   help="model instances (processes) serving requests; with --gpus, instances per GPU")
    p.add_argument("--gpus", help="N or all: one instance group per GPU (KIND_GPU, GPUs 0..N-1), each instance "
                                  "with its own KV cache and batch; Triton spreads requests over them (--device cuda)")
    p.add_argument("--batch-slots", type=int, default=0,
                   help="in-flight batching: concurrent requests share one running batch of this many slots "
                        "(0, the default: one request after the other per instance)")
    p.add_argument("--tree-sizing", default="load", choices=["load", "fixed"],
                   help="with --batch-slots: greedy requests' tree budgets chosen per step from the verify-latency "
                        "curve at the current batch width, down to plain decoding (load, the default), or as "
                        "configured (fixed)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per instance")
    p.add_argument("--drafter", help="lookup, medusa, draft or none (default: the manifest's)")
    p.add_argument("--tree", help="default tree: none, a preset name or inline JSON (requests may override)")
    p.add_argument("--max-request-bytes", type=int, default=MAX_BODY_BYTES,
                   help=f"largest HTTP request body taken (default {MAX_BODY_BYTES}); larger ones get 413")
    p.add_argument("--log-file", type=Path, help="tritonserver log (default: ~/.cache/treespec/logs/)")


def _print(message: str) -> None:
    print(message, flush=True)


def _on_signal(signum, frame):
    raise KeyboardInterrupt


def gpu_ids(value: str | None, device: str) -> tuple[int, ...]:
    """--gpus N|all as GPU ids (() without --gpus)."""
    if value is None:
        return ()
    if device != "cuda":
        raise InputError("--gpus needs --device cuda")
    if value == "all":
        count = _visible_gpus()
        if count == 0:
            raise InputError("--gpus all: no NVIDIA GPU is visible here")
        return tuple(range(count))
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"--gpus must be a positive number of GPUs or all, got {value!r}")
    count = _visible_gpus()
    if count and int(value) > count:
        raise InputError(f"--gpus {value}: only {count} GPU(s) are visible here")
    return tuple(range(int(value)))


def _visible_gpus() -> int:
    import torch  # an optional heavy dependency: only for --gpus

    return torch.cuda.device_count()


def serve(args: argparse.Namespace) -> int:
    """Write or reuse the model repository, run the service until Ctrl-C / SIGTERM. Returns 0."""
    if args.max_request_bytes < 1024:
        raise InputError(f"--max-request-bytes must be at least 1024, got {args.max_request_bytes}")
    gpus = gpu_ids(args.gpus, args.device)
    repo = args.repo or default_repo_dir(args.artifacts, args.backend, args.device)
    reused = ensure_triton_repo(args.artifacts, repo, backend=args.backend, device=args.device,
                                instances=args.instances, threads=args.threads, drafter=args.drafter, tree=args.tree,
                                batch_slots=args.batch_slots, tree_sizing=args.tree_sizing, gpus=gpus)
    _print(f"model repository: {repo} ({'reused' if reused else 'written'})"
           + (f"; {args.instances} instance(s) on each of GPUs {', '.join(map(str, gpus))}" if gpus else ""))
    log_file = args.log_file
    if log_file is None:  # kept after the server stops, unlike its temporary working directory
        log_file = cache_root() / "logs" / f"tritonserver-{args.port}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.unlink(missing_ok=True)
    service = TritonService(repo, args.port, args.grpc_port, args.metrics_port, log_file=log_file,
                            max_body=args.max_request_bytes, on_event=lambda m: _print(f"[supervisor] {m}"),
                            openai=OpenAIOptions(args.served_model_name,
                                                 load_manifest(args.artifacts).dims.max_context))
    previous = signal.signal(signal.SIGTERM, _on_signal)
    try:
        _print("starting tritonserver (loading the model)...")
        service.start()
        _print(f"ready in {service.server.startup_s:.1f} s\n"
               f"  HTTP     {service.http_url}   (POST /v2/models/treespec/generate, /generate_stream)\n"
               f"  OpenAI   {service.http_url}/v1   (completions, chat/completions, models: "
               f"model {args.served_model_name!r})\n"
               f"  gRPC     {service.grpc_url}\n"
               f"  metrics  {service.metrics_url}\n"
               f"  log      {service.server.log_file}\n"
               "Ctrl-C stops the server.")
        while True:  # the supervisor keeps the server up; only a signal ends this
            signal.pause()
    except KeyboardInterrupt:
        return _stop(service)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if service.server.alive():
            service.kill()
        service.server.cleanup()


def _stop(service: TritonService) -> int:
    _print("stopping tritonserver (waiting for in-flight requests; Ctrl-C again to force)...")
    try:
        code = service.stop()
    except KeyboardInterrupt:
        code = service.kill()
        _print("forced")
    _print(f"stopped (exit code {code})")
    if code and service.server.reloads:
        _print("(a model's stub died with a request in flight earlier: Triton 2.51 never releases such a "
               "request, so it waited --exit-timeout-secs for it)")
    return 0


def run(args: argparse.Namespace) -> int:
    return serve(args)
