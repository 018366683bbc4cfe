"""``drmerge api`` and ``drmerge worker``: run the HTTP API (uvicorn) or a Celery merge
worker in the foreground, configured by the DRMERGE_* settings (service.settings).

These are what the container images run (Dockerfile ``CMD ["api"]``/``["worker"]``) and
what drmerge_ops.processes starts in the background for ``dev up`` and the tests. Imports
stay inside the commands: ``drmerge api`` never imports torch or the worker.
"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("api", help="run the HTTP API (uvicorn)")
    p.add_argument("--host", help="listen address (default DRMERGE_API_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default DRMERGE_API_PORT or 8000)")
    p.add_argument("--workers", type=int, help="uvicorn worker processes (default DRMERGE_API_WORKERS or 1)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_api)

    p = subparsers.add_parser("worker", help="run a Celery merge worker (one merge at a time)")
    p.add_argument("--hostname", help="worker name (default drmerge@<host>)")
    p.add_argument("--queue", help="queue to consume (default DRMERGE_QUEUE or drmerge)")
    p.add_argument("--pool", default="threads", choices=("threads", "solo"),
                   help="threads (default): the merge runs on a pool thread (one at a time) while the main "
                        "thread keeps answering the broker, so health-check pings work mid-merge; solo runs it "
                        "on the main thread, which cannot answer pings while it merges. Forking pools are not "
                        "offered because CUDA does not survive a fork")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_worker)


def cmd_api(args) -> int:
    """Check what can be checked before uvicorn starts (settings, auth, the port), so a
    misconfiguration is one ``error:`` line; then serve until SIGTERM."""
    from drmerge.cli import CommandError

    from .preflight import check_listen, load_settings, require_modules

    require_modules("api", "service", "fastapi", "uvicorn", "redis", "celery")
    import uvicorn

    from service.app import ConfigError, create_app

    s = load_settings()
    host, port = args.host or s.api_host, args.port or s.api_port
    workers = args.workers or s.api_workers
    try:
        app = create_app(s)  # every check create_app makes, here (it connects to nothing yet)
    except (ConfigError, ValueError) as e:
        raise CommandError("invalid_config", str(e)) from None
    check_listen(host, port)
    # SIGTERM: uvicorn stops accepting, lets in-flight requests finish (up to the timeout),
    # then runs the app's shutdown (webhook loop, reaper). Several workers need the
    # factory's import string (each process builds its own app).
    target = app if workers == 1 else "service.app:create_app"
    try:
        uvicorn.run(target, factory=workers != 1, host=host, port=port, workers=workers, log_level=args.log_level,
                    proxy_headers=True, timeout_keep_alive=s.api_keep_alive_s,
                    timeout_graceful_shutdown=s.api_shutdown_timeout_s or None)
    except SystemExit as e:  # uvicorn exits non-zero when startup fails (after logging why)
        if e.code not in (0, None):
            raise CommandError("unavailable", f"the API did not start on {host}:{port} (uvicorn exited with "
                                              f"{e.code}; its log above says why)") from None
    return 0


def cmd_worker(args) -> int:
    from drmerge.cli import CommandError

    from .preflight import load_settings, require_modules

    require_modules("worker", "worker", "celery", "redis", "torch", "safetensors")
    s = load_settings()
    if s.worker_device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CommandError("invalid_config", "DRMERGE_WORKER_DEVICE=cuda but no CUDA device is visible")
    from worker.celery_app import celery_app

    argv = ["worker", f"--queues={args.queue or s.queue}", "--concurrency=1", f"--pool={args.pool}",
            f"--loglevel={args.log_level}", "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    else:
        argv.append("--hostname=drmerge@%h")
    try:
        celery_app.worker_main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise CommandError("unavailable", f"the worker stopped with status {e.code} (its log above says why)",
                               exit_code=e.code if isinstance(e.code, int) else 1) from None
    return 0
