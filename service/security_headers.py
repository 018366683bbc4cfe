"""Security headers on the pages a browser renders: the job page (/ui) and the API docs
(/docs, /redoc). Pure ASGI (it only adds headers to ``http.response.start``), so event
streams pass through untouched.

The Content-Security-Policy keeps every page to this origin: scripts, styles, images and
requests from the API itself, no framing. The docs need inline script and style (the
page that starts Swagger UI is inline; ReDoc styles itself at run time) and ReDoc's
search runs in a blob: worker; nothing of theirs may reach another host either, so the
ReDoc logo it would fetch from its vendor's CDN is not requested at all.
"""

from __future__ import annotations

UI_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
          "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
COMMON = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}

# (path prefix, headers): the first that matches applies.
RULES = (
    ("/ui", {**COMMON, "content-security-policy": UI_CSP, "cache-control": "no-cache"}),
    ("/docs", {**COMMON, "content-security-policy": DOCS_CSP}),
    ("/redoc", {**COMMON, "content-security-policy": DOCS_CSP}),
)


class SecurityHeadersMiddleware:
    def __init__(self, app, rules=RULES):
        self.app = app
        self.rules = [(prefix, [(k.encode(), v.encode()) for k, v in headers.items()]) for prefix, headers in rules]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        extra = next((h for prefix, h in self.rules if path == prefix or path.startswith(prefix + "/")), None)
        if extra is None:
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k for k, _ in extra}
                message = dict(message)
                message["headers"] = [(k, v) for k, v in message.get("headers", []) if k not in names] + extra
            await send(message)

        return await self.app(scope, receive, send_with_headers)
