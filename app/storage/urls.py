"""The control plane's own blob URLs (`/blobs/<token>`): signed grants for one key, and download headers.

The local store serves every upload and download through these URLs; the S3 store relays uploads
through them when a client does not declare the size up front, so that the size limit is enforced
on the bytes themselves (a plain presigned S3 PUT accepts up to 5 GiB).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import quote

from app.signing import InvalidTokenError, Signer
from app.storage.base import BlobGrant
from app.storage.streams import validate_key

# A download's file name is a header value: long enough for any real name, short enough for proxies.
_MAX_FILENAME_CHARS = 150


class BlobUrls:
    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    def url(self, base_url: str, grant: BlobGrant, *, expires_in: int) -> str:
        claims = {
            "k": validate_key(grant.key),
            "m": grant.method,
            "f": grant.filename,
            "s": grant.sha256,
            "c": validate_key(grant.closed_by) if grant.closed_by else None,
        }
        return f"{base_url.rstrip('/')}/blobs/{self._signer.dumps(claims, expires_in=expires_in)}"

    def verify(self, token: str, method: str) -> BlobGrant:
        return verify_blob_token(self._signer, token, method)


def verify_blob_token(signer: Signer, token: str, method: str) -> BlobGrant:
    """The grant a token minted by `BlobUrls.url` carries; InvalidTokenError otherwise."""
    claims = signer.loads(token)
    key, filename, sha256, closed_by = (claims.get(name) for name in ("k", "f", "s", "c"))
    if claims.get("m") != method.upper():
        raise InvalidTokenError(f"issued for {claims.get('m')}, not {method.upper()}")
    if not isinstance(key, str) or not all(
        v is None or isinstance(v, str) for v in (filename, sha256, closed_by)
    ):
        raise InvalidTokenError("malformed payload")
    try:
        validate_key(key)
        if closed_by is not None:
            validate_key(closed_by)
    except ValueError as exc:
        raise InvalidTokenError("malformed payload") from exc
    return BlobGrant(key=key, method=method.upper(), filename=filename, sha256=sha256, closed_by=closed_by)


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII fallback and RFC 5987's UTF-8 form (RFC 6266), safe for any name.

    Quotes, backslashes, semicolons, control characters (CR/LF) and non-ASCII never reach the fallback,
    and the UTF-8 form is percent-encoded, so no name can end the header or add a parameter.
    """
    name = _shortened(filename.replace("/", "_").replace("\\", "_")) or "download"
    # `;` is legal inside the quotes, but naive clients split on it.
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%;' else "_" for c in name)
    encoded = quote(name.encode("utf-8", "replace"), safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def _shortened(name: str) -> str:
    if len(name) <= _MAX_FILENAME_CHARS:
        return name
    suffix = PurePosixPath(name).suffix[:16]
    return name[: _MAX_FILENAME_CHARS - len(suffix)] + suffix
