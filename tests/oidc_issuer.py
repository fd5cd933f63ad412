"""A minimal OpenID Connect issuer for the tests: its discovery document
and JWKS served over real HTTP on loopback (``http.server``), signing keys
generated with ``cryptography``, tokens signed with PyJWT.  It is what the
appliance fetches and verifies against, not a mock of the verifier."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

AUDIENCE = "dicom-appliance"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class Issuer:
    """An issuer at ``http://127.0.0.1:PORT/realm`` with one RSA key
    published (more with :meth:`add_key`, replaced with :meth:`rotate`)."""

    def __init__(self) -> None:
        self.keys: dict[str, PrivateKey] = {}
        self.published: list[str] = []
        self.jwks_requests = 0
        self.discovery_requests = 0
        self.kid = self.add_key()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/realm/.well-known/openid-configuration":
                    issuer.discovery_requests += 1
                    body: Any = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
                elif self.path == "/realm/jwks":
                    issuer.jwks_requests += 1
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/realm"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def add_key(self, kind: str = "RSA", *, publish: bool = True) -> str:
        kid = uuid.uuid4().hex[:8]
        key: PrivateKey
        if kind == "RSA":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        self.keys[kid] = key
        if publish:
            self.published.append(kid)
        return kid

    def rotate(self) -> str:
        """A new key replaces every published one; the new kid."""
        kid = self.add_key()
        self.published = [kid]
        self.kid = kid
        return kid

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid in self.published:
            key = self.keys[kid]
            if isinstance(key, rsa.RSAPrivateKey):
                jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
                jwk["alg"] = "RS256"
            else:
                jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
                jwk["alg"] = "ES256"
            jwk.update(kid=kid, use="sig")
            keys.append(jwk)
        return {"keys": keys}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "user-1",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "roles": ["read"],
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, kid: str | None = None, algorithm: str | None = None, **claims: Any) -> str:
        kid = kid or self.kid
        key = self.keys[kid]
        if algorithm is None:
            algorithm = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        return jwt.encode(self.claims(**claims), key, algorithm=algorithm, headers={"kid": kid})


def running_issuer() -> Iterator[Issuer]:
    issuer = Issuer()
    try:
        yield issuer
    finally:
        issuer.close()
