"""`python -m launch serve`: the morphology service (FastAPI app, run by uvicorn) for one registered model or export.

Replicas are stateless: run as many as you like behind a load balancer (`python -m launch sbatch --entry serve`
puts one on each node of a job); each follows the registry alias on its own.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path

EPILOG = """examples:
  python -m launch serve --model models:/morphology@production --port 8000       # follows the alias
  python -m launch serve --model runs/mixed --device cpu --max-batch 16          # an export folder, as it is
  python -m launch serve --model models:/morphology/3 --drift-reference runs/mixed/drift_reference
  curl -F survey=decals -F file=@J123.fits -F file=@J124.fits http://127.0.0.1:8000/v1/predict
  curl http://127.0.0.1:8000/v1/model; curl http://127.0.0.1:8000/metrics
  kill -HUP <pid>     # check the alias now (or: curl -X POST http://127.0.0.1:8000/v1/reload)
Uploads: JPEG/PNG as the shards hold them (square, 8-bit), or FITS cutouts in flux with the survey's bands
(one cube per galaxy, bluest band first; .fits.gz too), rendered like sharding.build. An image smaller than the
model's input is refused (no upsampling). Bad input gets a 4xx saying what is wrong; the service keeps serving."""


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m launch serve", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a morphology model over HTTP: micro-batched inference on CPU or GPU, the registry "
                    "alias followed without downtime, Prometheus metrics with drift scores.")
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, NAME@ALIAS, or an "
                                                       "export / training run folder")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--max-batch", type=int, default=32, help="galaxies per forward pass at most")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long the first queued galaxy waits for others to join its batch")
    parser.add_argument("--mc-samples", type=int, default=0, help="default MC dropout passes (a request may ask)")
    parser.add_argument("--max-mc-samples", type=int, default=64)
    parser.add_argument("--follow-alias-seconds", type=float, default=10.0,
                        help="how often to check the alias (0: never; SIGHUP and POST /v1/reload still do)")
    parser.add_argument("--drift-reference", help="drift reference (eval drift); default: the registered "
                                                  "model's own, if any; none: drift off")
    parser.add_argument("--drift-window", type=int, default=256, help="images per survey in the rolling window")
    parser.add_argument("--render-size", type=int, help="FITS rendering size for every survey (default: the size "
                                                        "of the model's training shards of the survey, else its YAML)")
    parser.add_argument("--max-upload-mb", type=float, default=8.0, help="request body limit (413 past it)")
    parser.add_argument("--max-files", type=int, default=64, help="galaxies per request at most")
    parser.add_argument("--workers-threads", type=int,
                        help="torch threads for inference (default: half the CPUs this process may use)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the "
                                               "registry's embedded store)")
    parser.add_argument("--cache-dir", help="where registered versions are downloaded")
    parser.add_argument("--log-level", default="warning", help="uvicorn's (info logs every request)")
    return parser.parse_args(argv)


def settings_from(args):
    from launch.serve_app import AppSettings
    from launch.serve_model import registry_module
    from launch.serve_service import ServiceSettings

    if args.max_upload_mb <= 0 or args.max_files < 1:
        raise ValueError(f"--max-upload-mb must be > 0 and --max-files >= 1, got {args.max_upload_mb} and "
                         f"{args.max_files}")
    tracking_uri = args.tracking_uri
    if tracking_uri is None and not Path(args.model).is_dir():  # a registered model: MLFLOW_TRACKING_URI or default
        tracking_uri = registry_module().default_tracking_uri(os.environ)
    service = ServiceSettings(model=args.model, device=args.device, max_batch=args.max_batch,
                              max_wait_ms=args.max_wait_ms, mc_samples=args.mc_samples,
                              max_mc_samples=args.max_mc_samples, follow_alias_seconds=args.follow_alias_seconds,
                              drift_reference=args.drift_reference, drift_window=args.drift_window,
                              render_size=args.render_size, tracking_uri=tracking_uri, cache_dir=args.cache_dir)
    return service, AppSettings(int(args.max_upload_mb * 2**20), args.max_files)


def advertised(host: str, port: int) -> str:
    """The address clients use: the node's name when bound to every interface (what a cluster job's log shows)."""
    name = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    return f"http://{name}:{port}"


def start_message(service, host: str, port: int) -> str:
    served = service.current
    drift = (f"drift against {served.drift_reference}" if served.drift is not None
             else "drift monitoring off (no --drift-reference and none registered with the model)")
    follow = (f"following {service.slot.alias[0]}@{service.slot.alias[1]} every "
              f"{service.settings.follow_alias_seconds:g} s" if service.slot.alias else "fixed version")
    return (f"serving {served.ref.uri} (name {served.ref.name}, version {served.version}, weights "
            f"{served.weights_sha256[:12]}) on {served.device.type} at {advertised(host, port)}\n"
            f"  {follow}; micro-batches of up to {service.settings.max_batch} after {service.settings.max_wait_ms:g} "
            f"ms; {drift}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
        import uvicorn

        from launch.serve_app import create_app
        from launch.serve_service import Service

        service_settings, app_settings = settings_from(args)
        service = Service(service_settings)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Half the CPUs this process may use: decoding, HTTP and (on a shared machine) clients need the rest, and
    # OpenMP threads that wait for a busy core make every forward slow (docs/BENCHMARKS.md, Service).
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.workers_threads or max(1, cpus // 2))
    server = uvicorn.Server(uvicorn.Config(create_app(service, app_settings), host=args.host, port=args.port,
                                           log_level=args.log_level, access_log=args.log_level in ("debug", "info")))
    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        # The check (a registry call, maybe a load) runs in its own thread, not in the signal handler.
        signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(target=service.reload, daemon=True).start())
    print(start_message(service, args.host, args.port), flush=True)
    try:
        server.run()
    finally:
        service.close()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
