"""The `Tuneforge` entry point: resolves the server URL and API token, and owns the namespaces."""

from __future__ import annotations

import os
from types import TracebackType

from tuneforge._http import HttpTransport, RetryPolicy
from tuneforge.adapters import Adapters
from tuneforge.datasets import Datasets
from tuneforge.deployments import Deployments
from tuneforge.errors import AuthenticationError
from tuneforge.finetuning import Finetuning
from tuneforge.repos import Repos

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# tuneforge's own names first; the Predibase SDK's names make existing environments work unchanged.
TOKEN_ENV_VARS = ("TUNEFORGE_API_TOKEN", "PREDIBASE_API_TOKEN")
URL_ENV_VARS = ("TUNEFORGE_URL", "PREDIBASE_GATEWAY")
# Where a local `tuneforge up` keeps its state and its development token (the server's Settings
# read these same names): the CLI finds that token without importing the server.
DATA_DIR_ENV = "TUNEFORGE_DATA_DIR"
DEFAULT_DATA_DIR = ".tuneforge"
DEV_TOKEN_FILE = "dev-token"


class Tuneforge:
    """A client for one tuneforge server, with the Predibase SDK's call shapes.

    >>> pb = Tuneforge()  # TUNEFORGE_URL / PREDIBASE_GATEWAY and TUNEFORGE_API_TOKEN / PREDIBASE_API_TOKEN
    >>> dataset = pb.datasets.from_file("qa.csv")
    >>> repo = pb.repos.create("my-repo", exists_ok=True)
    >>> version = pb.adapters.upload("./my-adapter", repo="my-repo")
    >>> trained = pb.adapters.create(
    ...     config=FinetuningConfig(base_model="smollm2-135m"), dataset=dataset, repo="my-repo"
    ... )

    Namespaces: `datasets`, `repos`, `adapters`, `finetuning` (`finetuning.jobs`), `deployments`
    (`deployments.client(name).generate(prompt, adapter_id="repo/1")`). Every failure
    raises a TuneforgeError subclass. Use it as a context manager, or call `close()`, to release
    pooled connections.
    """

    def __init__(
        self,
        api_token: str | None = None,
        base_url: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        poll_interval: float = 1.0,
    ) -> None:
        """`api_token` and `base_url` default to the environment (see the class docstring).

        `timeout` bounds each HTTP request; `max_retries` is how many times an idempotent request is
        retried on 429/503 or a network error; `poll_interval` caps the wait between status polls.
        """
        token = api_token or first_env(TOKEN_ENV_VARS)
        if not token:
            raise AuthenticationError(
                "no API token: pass api_token=... or set TUNEFORGE_API_TOKEN (or PREDIBASE_API_TOKEN); "
                "`tuneforge token create --tenant NAME` mints one"
            )
        self.base_url = normalize_base_url(base_url or first_env(URL_ENV_VARS) or DEFAULT_BASE_URL)
        self._http = HttpTransport(
            self.base_url, token, timeout=timeout, retry=RetryPolicy(max_retries=max_retries)
        )
        self.datasets = Datasets(self._http, poll_interval=poll_interval)
        self.repos = Repos(self._http)
        self.finetuning = Finetuning(self._http, poll_interval=poll_interval)
        self.adapters = Adapters(self._http, self.repos, self.finetuning.jobs, poll_interval=poll_interval)
        self.deployments = Deployments(self._http, token, poll_interval=poll_interval)

    def close(self) -> None:
        """Release pooled connections; the client must not be used afterwards."""
        self._http.close()
        self.deployments.close()

    def __enter__(self) -> Tuneforge:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tuneforge(base_url={self.base_url!r})"


def normalize_base_url(url: str) -> str:
    """Accept what users paste: a trailing slash, a `/v1` or `/v2` suffix, or no scheme (http assumed)."""
    url = url.strip().rstrip("/")
    for suffix in ("/v1", "/v2"):
        url = url.removesuffix(suffix)
    if "://" not in url:
        url = f"http://{url}"
    return url


def first_env(names: tuple[str, ...]) -> str | None:
    """The first of these environment variables that is set to something other than blanks."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None
