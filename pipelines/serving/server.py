"""Starting and stopping the Serve application on a Ray cluster, serving until Ctrl-C, and the config file of
`serve deploy` (`mrcnn-cli serve --write-config`).

`start_server(options, ctx)` connects to Ray through the run context, starts Serve's HTTP proxy on options.host and
options.port (127.0.0.1 by default: nothing outside the machine reaches it unless asked), deploys the application
(pipelines/serving/app.py) and returns its address once every replica is up. `stop_server()` deletes the
application and shuts Serve down. `serve_until_interrupted` is the command: start, say where, wait for Ctrl-C
(SIGINT), stop.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import yaml

from pipelines.infra.context import RunContext
from pipelines.infra.logs import get_logger
from pipelines.infra.storage import write_bytes
from pipelines.serving.options import ServeOptions

log = get_logger("serve")

APP_NAME = "mrcnn"
IMPORT_PATH = "pipelines.serving.app:app_builder"


def replica_threads(options: ServeOptions, use_gpu: bool) -> int | None:
    """CPUs (and torch threads) of a CPU replica: --cpus-per-replica, else evaluate's sizing of its model actors
    (`model_actor_cpus`: the cluster's CPUs but one, shared by the replicas); None with GPUs."""
    if use_gpu:
        return None
    if options.cpus_per_replica is not None:
        return options.cpus_per_replica
    from pipelines.evaluation.evaluate import model_actor_cpus
    from pipelines.infra.ray_env import largest_node_cpus, usable_cpus

    replicas = options.autoscale[1] if options.autoscale else options.replicas
    return model_actor_cpus(usable_cpus(), replicas, largest_node=largest_node_cpus())


def start_server(options: ServeOptions, ctx: RunContext, *, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Deploy the application `name` at `route_prefix` on the context's Ray (GPU replicas when ctx says so); returns
    its address (http://HOST:PORT plus the prefix) once every replica is up."""
    from dataclasses import replace

    from ray import serve

    from pipelines.serving.app import build_app

    spec = options.spec()  # a bad source or --set fails here, before Ray starts
    if ctx.tracking_uri is None and spec.tracking_uri is not None:
        options = replace(options, tracking_uri=spec.tracking_uri)
    ctx.start_ray()
    use_gpu = ctx.gpus()  # --gpu / --no-gpu, else whether the cluster has GPUs
    options = replace(options, use_gpu=use_gpu)
    serve.start(http_options={"host": options.host, "port": options.port})
    app = build_app(options, spec, threads=replica_threads(options, use_gpu))
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    address = f"http://{options.host}:{options.port}{route_prefix.rstrip('/')}"
    log.info("serving %s at %s (%s)", spec.location, address, "GPU replicas" if use_gpu else "CPU replicas")
    return address


def stop_server(name: str = APP_NAME) -> None:
    """Delete the application and shut Serve down (the Ray cluster stays)."""
    from ray import serve

    try:
        serve.delete(name)
    finally:
        serve.shutdown()


def serve_until_interrupted(options: ServeOptions, ctx: RunContext, on_ready: Callable[[str], None]) -> None:
    """Start the server, call on_ready(address), wait for SIGINT (Ctrl-C) or SIGTERM, then stop it cleanly. The
    handlers are installed once Ray is up (after whatever handlers ray.init installs) and restored at the end."""
    address = start_server(options, ctx)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        on_ready(address)
        while not stop.wait(0.5):
            pass
        log.info("stopping the server")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_server()


def serve_config(options: ServeOptions) -> dict[str, Any]:
    """The config `serve deploy` takes (Ray Serve's ServeDeploySchema): the HTTP options and one application built
    by `pipelines.serving.app:app_builder` from the options."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": options.host, "port": options.port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
                          "args": options.to_args()}],
    }


def write_serve_config(options: ServeOptions, path: str) -> str:
    """Write `serve_config` as YAML to `path` (complete or absent); returns the path."""
    write_bytes(path, yaml.safe_dump(serve_config(options), sort_keys=False).encode())
    return path
