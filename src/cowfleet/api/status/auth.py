"""Who is looking at the status page.

Scripts send ``X-Auth-Token`` as on every other route. Browsers log in once through
the page's form (``POST /status/login``, the token in the body, never in a URL that
proxies and history keep); the answer sets a cookie holding the token, ``HttpOnly``
(no script reads it), ``SameSite=Strict`` (no other site's page sends it),
``Path=/status``, ``Secure`` when the request came over HTTPS (directly or as
``X-Forwarded-Proto``), for :data:`COOKIE_MAX_AGE`. A cookie is looked up in the
tokens file on every request, so a token removed from the file stops working at once.
"""

from __future__ import annotations

from urllib.parse import parse_qs, quote, unquote, urlsplit

from starlette.requests import Request
from starlette.responses import Response

from cowfleet.tokens import Principal, TokenTable

COOKIE = "cowfleet_status"
COOKIE_PATH = "/status"
COOKIE_MAX_AGE = 8 * 3600
MAX_FORM = 4096


def token_of(request: Request) -> str:
    """The token a request carries: the header first, else the login cookie."""
    header = request.headers.get("x-auth-token")
    if header:
        return header
    return unquote(request.cookies.get(COOKIE, ""))


def principal_of(request: Request, tokens: TokenTable) -> Principal | None:
    return tokens.lookup(token_of(request))


def is_https(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def same_origin(request: Request) -> bool:
    """False when the browser says the form was posted from another site.

    Browsers send ``Sec-Fetch-Site``; older ones only ``Origin`` (``null`` when a page's
    referrer policy hides it). A client that sends neither (a script) is not a browser
    another site could drive, and is let through.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin != "null" and urlsplit(origin).netloc.lower() == host.lower()


def form_token(body: bytes) -> str:
    """The ``token`` field of an ``application/x-www-form-urlencoded`` body ('' if none)."""
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        return ""
    values = fields.get("token") or [""]
    return values[0].strip()


def set_login(response: Response, token: str, *, secure: bool) -> None:
    response.set_cookie(
        COOKIE,
        quote(token, safe=""),
        max_age=COOKIE_MAX_AGE,
        path=COOKIE_PATH,
        secure=secure,
        httponly=True,
        samesite="strict",
    )


def clear_login(response: Response, *, secure: bool) -> None:
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, secure=secure, httponly=True, samesite="strict"
    )
