"""/ui serves the dashboard's own files, with a content-security policy and no token needed to load it."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.dashboard import STATIC_DIR

_IMPORT = re.compile(r'from "\./([\w.-]+)"')


def test_the_page_is_served_with_a_strict_content_security_policy(api_app: TestClient) -> None:
    response = api_app.get("/ui/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="app.js">' in response.text
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe" not in policy and "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in response.headers
    assert api_app.get("/ui").url.path == "/ui/"  # the bare path leads to the page


def test_scripts_and_styles_are_served_with_their_types(api_app: TestClient) -> None:
    script = api_app.get("/ui/app.js").headers["content-type"]
    assert script.startswith(("text/javascript", "application/javascript"))
    assert api_app.get("/ui/style.css").headers["content-type"].startswith("text/css")
    assert api_app.get("/ui/nothing.js").status_code == 404


def test_every_module_a_script_imports_is_there() -> None:
    scripts = sorted(STATIC_DIR.glob("*.js"))
    imported = {name for path in scripts for name in _IMPORT.findall(path.read_text())}
    assert imported, "the modules import each other"
    assert imported <= {path.name for path in scripts}
