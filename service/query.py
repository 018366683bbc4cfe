"""Query parameters: every one a route does not read is refused (422 ``invalid_request``
naming it), never silently ignored, so a misspelt filter (``?stauts=failed``) is an error
and not a list of every job.

``known_query_only`` runs for every API route (an app-wide dependency): the names a route
reads are those of its declared query parameters plus the families (``metadata[...]``) of
its ``QueryFamily`` dependencies.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.routing import APIRoute

from .problems import Problem


class QueryFamily:
    """A dependency that reads every query parameter named ``<prefix>[<key>]``, as a dict
    (``?metadata[team]=nlp&metadata[run]=42`` -> ``{"team": "nlp", "run": "42"}``)."""

    def __init__(self, prefix: str, max_items: int, max_key: int, max_value: int):
        self.prefix, self.max_items, self.max_key, self.max_value = prefix, max_items, max_key, max_value

    def owns(self, name: str) -> bool:
        return name.startswith(self.prefix + "[")

    async def __call__(self, request: Request) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in request.query_params.multi_items():
            if not self.owns(name):
                continue
            key = name[len(self.prefix) + 1:]
            if not key.endswith("]") or len(key) < 2 or "[" in key[:-1] or "]" in key[:-1]:
                raise Problem(422, "invalid_request", f"{name}: write {self.prefix}[KEY]=VALUE (one key, "
                              "in square brackets)", name)
            key = key[:-1]
            if len(key) > self.max_key or len(value) > self.max_value:
                raise Problem(422, "invalid_request", f"{name}: keys are at most {self.max_key} and values at most "
                              f"{self.max_value} characters", name)
            if key in out and out[key] != value:
                raise Problem(422, "invalid_request", f"{name}: given twice with different values", name)
            out[key] = value
        if len(out) > self.max_items:
            raise Problem(422, "invalid_request", f"{self.prefix}: at most {self.max_items} filters", self.prefix)
        return out


_KNOWN: dict[int, tuple[frozenset[str], tuple[QueryFamily, ...]]] = {}


def _route_query(route: APIRoute) -> tuple[frozenset[str], tuple[QueryFamily, ...]]:
    found = _KNOWN.get(id(route))
    if found is None:
        names, families, stack = set(), [], [route.dependant]
        while stack:
            dep = stack.pop()
            names.update(p.alias for p in dep.query_params)
            if isinstance(dep.call, QueryFamily):
                families.append(dep.call)
            stack.extend(dep.dependencies)
        found = _KNOWN[id(route)] = (frozenset(names), tuple(families))
    return found


async def known_query_only(request: Request) -> None:
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.include_in_schema:
        return  # the docs' own pages (oauth2 redirect) and mounts are not ours to police
    names, families = _route_query(route)
    for name in request.query_params.keys():
        if name not in names and not any(f.owns(name) for f in families):
            known = ", ".join(sorted(names) + [f"{f.prefix}[KEY]" for f in families]) or "none"
            raise Problem(422, "invalid_request", f"{name}: unknown query parameter (this route takes: {known})",
                          name)
