"""Which server the remote commands talk to and with which token: flags, then environment, then the
embedded stack's defaults (`tuneforge up` on this machine)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from urllib.parse import urlsplit

from tuneforge import AuthenticationError, Tuneforge
from tuneforge.client import (
    DATA_DIR_ENV,
    DEFAULT_BASE_URL,
    DEFAULT_DATA_DIR,
    DEV_TOKEN_FILE,
    TOKEN_ENV_VARS,
    URL_ENV_VARS,
    first_env,
    normalize_base_url,
)

# The embedded development token is sent only to a server on this machine: a URL elsewhere must
# never receive a local secret it did not ask for.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def server_url(args: argparse.Namespace) -> str:
    """`--url`, else TUNEFORGE_URL / PREDIBASE_GATEWAY, else where `tuneforge up` listens by default."""
    chosen = args.url or first_env(URL_ENV_VARS) or DEFAULT_BASE_URL
    return normalize_base_url(chosen)


def api_token(args: argparse.Namespace, url: str) -> str:
    """`--token`, else TUNEFORGE_API_TOKEN / PREDIBASE_API_TOKEN, else the embedded dev token.

    The dev token (`<data dir>/dev-token`, written by `tuneforge up`) is used only for a server on
    this machine. Raises AuthenticationError, saying what to set, when none is found.
    """
    token = args.token or first_env(TOKEN_ENV_VARS)
    if token:
        return token
    token_file = _dev_token_file(args.data_dir)
    if urlsplit(url).hostname in LOOPBACK_HOSTS and token_file.is_file():
        return token_file.read_text().strip()
    raise AuthenticationError(
        "no API token: pass --token or set TUNEFORGE_API_TOKEN (`tuneforge token create --tenant NAME` "
        f"mints one); for a local `tuneforge up`, the token is read from {token_file}"
    )


def connect(args: argparse.Namespace) -> Tuneforge:
    """A client for the chosen server; the caller closes it."""
    url = server_url(args)
    return Tuneforge(api_token=api_token(args, url), base_url=url, poll_interval=0.5)


def _dev_token_file(data_dir: str | None) -> Path:
    """`--data-dir`, else TUNEFORGE_DATA_DIR, else the server's default, as `tuneforge up` resolves it."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser().absolute() / DEV_TOKEN_FILE
