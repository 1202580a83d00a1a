"""Who is calling: JupyterHub authentication for the MLflow gate (an ASGI app, not tornado).

* API clients, kernels and scheduled runs send a hub token: ``Authorization: Bearer <token>``
  (what the MLflow client sends from ``MLFLOW_TRACKING_TOKEN``) or ``Authorization: token <token>``.
* Browsers log in with the hub's OAuth flow as the hub service ``mlflow``: an unauthenticated
  page load is redirected to the hub's authorize URL (state and PKCE verifier in a signed,
  short-lived cookie, so any worker process can finish the login), the callback exchanges the
  code for a token and keeps it in a signed cookie scoped to the service's prefix.

Either way the token is checked with the hub (``GET /hub/api/user``, :class:`HubOAuth`'s cache
for ``cache_max_age`` seconds); it must belong to a user and carry the service's access scope
(``access:services!service=mlflow``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlencode

from itsdangerous import BadSignature, URLSafeSerializer, URLSafeTimedSerializer

from .objects import Refused

log = logging.getLogger("labyard.mlflow_gate")

STATE_MAX_AGE = 600


class HubLogin:
    """Authentication of gate requests against the hub.

    Args:
        hub_auth: a :class:`jupyterhub.services.auth.HubOAuth` for this service (its api_token,
            client id, redirect URI and access scopes).
        prefix: the service's URL prefix (``/services/mlflow/``); cookies are scoped to it.
        timeout: seconds to wait for the hub before answering 503.
    """

    def __init__(self, hub_auth, prefix: str, timeout: float = 10.0):
        self.hub = hub_auth
        self.prefix = prefix
        self.timeout = timeout
        # the cookie key is derived from the service's token: every worker (and replica) shares it,
        # and a new token logs browsers out (they log in again through the hub at once)
        key = hmac.new(hub_auth.api_token.encode(), b"labyard-mlflow-gate-cookies", hashlib.sha256).hexdigest()
        self._token_cookie = URLSafeSerializer(key, salt="token")
        self._state_cookie = URLSafeTimedSerializer(key, salt="oauth-state")
        self.cookie_name = "labyard-mlflow"
        self.state_cookie_name = "labyard-mlflow-oauth-state"

    # ---- tokens ------------------------------------------------------------------------------
    @staticmethod
    def _header_token(headers: dict[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() in ("bearer", "token") and value.strip():
            return value.strip()
        return None

    def _cookie_token(self, headers: dict[str, str]) -> str | None:
        raw = headers.get("cookie")
        if not raw:
            return None
        jar = SimpleCookie()
        try:
            jar.load(raw)
        except Exception:  # noqa: BLE001 - a malformed cookie header is just no cookie
            return None
        morsel = jar.get(self.cookie_name)
        if morsel is None:
            return None
        try:
            return self._token_cookie.loads(morsel.value)
        except BadSignature:
            return None

    async def _user_for_token(self, token: str) -> dict | None:
        try:
            return await asyncio.wait_for(self.hub.user_for_token(token, sync=False), self.timeout)
        except asyncio.TimeoutError as e:
            raise Refused(503, f"the hub did not answer within {self.timeout:.0f}s; try again", "TEMPORARILY_UNAVAILABLE") from e
        except Exception as e:  # tornado HTTPError from HubAuth: hub unreachable or refusing our token
            log.warning("checking a token with the hub failed: %s", e)
            raise Refused(503, "the hub could not check the login; try again", "TEMPORARILY_UNAVAILABLE") from e

    async def authenticate(self, headers: dict[str, str]) -> tuple[dict | None, str]:
        """The hub user making this request (None when it carries no valid login) and how it
        authenticated: ``"token"``, ``"cookie"`` or ``""``.

        Raises:
            Refused: 403 for a valid token that is not a user's or lacks the access scope; 503
                when the hub cannot be asked.
        """
        token, via = self._header_token(headers), "token"
        if token is None:
            token, via = self._cookie_token(headers), "cookie"
        if token is None:
            return None, ""
        model = await self._user_for_token(token)
        if model is None:
            return None, via
        if model.get("kind", "user") != "user":
            raise Refused(403, f"{model.get('kind')} {model.get('name')!r} is not a user: MLflow is used with a user's token")
        if not self.hub.check_scopes(self.hub.access_scopes, model):
            raise Refused(403, f"this token of {model.get('name')} may not use MLflow "
                               f"(it lacks {' or '.join(sorted(self.hub.access_scopes))})")
        return model, via

    # ---- browser login -----------------------------------------------------------------------
    def _cookie(self, name: str, value: str, max_age: int | None = None, secure: bool = False) -> str:
        parts = [f"{name}={value}", f"Path={self.prefix}", "HttpOnly", "SameSite=Lax"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if secure:
            parts.append("Secure")
        return "; ".join(parts)

    def login_redirect(self, next_url: str, secure: bool) -> tuple[int, list[tuple[str, str]]]:
        """Send a browser to the hub's OAuth authorize page; come back to ``next_url``."""
        verifier, challenge, method = self.hub.generate_pkce_code_challenge()
        state = secrets.token_urlsafe(16)
        cookie = self._state_cookie.dumps({"state": state, "next": next_url, "verifier": verifier})
        url = self.hub.login_url + "&" + urlencode({"state": state, "code_challenge": challenge,
                                                     "code_challenge_method": method})
        return 302, [("location", url), ("set-cookie", self._cookie(self.state_cookie_name, cookie, STATE_MAX_AGE, secure)),
                     ("cache-control", "no-store")]

    async def callback(self, query: str, headers: dict[str, str], secure: bool) -> tuple[int, list[tuple[str, str]]]:
        """Finish the OAuth login: check the state, get the token, set the login cookie."""
        args = {k: v[0] for k, v in parse_qs(query).items()}
        if "error" in args:
            raise Refused(400, f"the hub refused the login: {args.get('error_description', args['error'])}")
        jar = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001
            pass
        morsel = jar.get(self.state_cookie_name)
        try:
            state = self._state_cookie.loads(morsel.value, max_age=STATE_MAX_AGE) if morsel else None
        except BadSignature:
            state = None
        if not state or not args.get("state") or not hmac.compare_digest(state["state"], args["state"]):
            raise Refused(403, "the login's state does not match (it expired, or came from elsewhere); open MLflow again")
        if not args.get("code"):
            raise Refused(400, "the hub's callback carries no code")
        try:
            token = await asyncio.wait_for(
                self.hub.token_for_code(args["code"], code_verifier=state["verifier"], sync=False), self.timeout)
        except asyncio.TimeoutError as e:
            raise Refused(503, "the hub did not answer the login; try again", "TEMPORARILY_UNAVAILABLE") from e
        except Exception as e:  # noqa: BLE001 - HTTPError from HubOAuth (a code used twice, ...)
            raise Refused(403, f"the hub did not complete the login: {e}") from e
        next_url = state.get("next") or self.prefix
        if not next_url.startswith(self.prefix):  # only ever back into MLflow
            next_url = self.prefix
        return 302, [("location", next_url),
                     ("set-cookie", self._cookie(self.cookie_name, self._token_cookie.dumps(token), secure=secure)),
                     ("set-cookie", self._cookie(self.state_cookie_name, "", 0, secure)),
                     ("cache-control", "no-store")]
