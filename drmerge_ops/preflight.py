"""What ``drmerge api``, ``drmerge worker`` and ``drmerge keys`` check before they start,
so that a misconfiguration ends in one ``error: <code>: <message>`` line (drmerge.cli's
contract), never in a traceback from inside uvicorn or Celery.

Codes: ``invalid_config`` (a DRMERGE_* setting, a missing extra, a device that is not
there: the operator fixes the configuration) and ``unavailable`` (a port taken, a
server that does not answer: something outside is not ready).
"""

from __future__ import annotations

import importlib.util
import socket

from drmerge.cli import CommandError


def settings_error(e) -> str:
    """A pydantic ValidationError of service.settings.Settings, as the variables to fix."""
    parts = []
    for err in e.errors()[:3]:
        field = "_".join(str(x) for x in err.get("loc", ()) if isinstance(x, str))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"DRMERGE_{field.upper()}: {msg}" if field else msg)
    return "bad setting: " + "; ".join(parts)


def load_settings():
    """The DRMERGE_* settings (service.settings), or CommandError ``invalid_config``."""
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        raise CommandError("invalid_config", settings_error(e)) from None
    check_redis_url(settings.redis_url, "DRMERGE_REDIS_URL")
    if settings.broker_url:
        check_redis_url(settings.broker_url, "DRMERGE_BROKER_URL")
    return settings


def check_redis_url(url: str, name: str) -> None:
    import redis

    try:
        redis.connection.parse_url(url)
    except ValueError as e:
        raise CommandError("invalid_config", f"{name}={url!r}: {e}") from None


def require_modules(command: str, extra: str, *modules: str) -> None:
    """The packages ``command`` needs, or CommandError naming the extra to install."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CommandError("invalid_config", f"`drmerge {command}` needs {', '.join(missing)}: "
                                             f"pip install 'drmerge[{extra}]'")


def check_listen(host: str, port: int) -> None:
    """Bind (SO_REUSEADDR, as uvicorn does) and release ``host:port``: a port already
    taken is one clear line here, not a log record deep in uvicorn's startup."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CommandError("invalid_config", f"cannot listen on {host}:{port}: {e.strerror} "
                                             "(DRMERGE_API_HOST / --host)") from None
    family = infos[0][0]
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise CommandError("unavailable", f"cannot listen on {host}:{port}: {e.strerror or e} "
                                          "(is another API running there? pick a port with --port)") from None
