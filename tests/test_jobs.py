"""The jobs API of a real `ray start --head` cluster keeps token authentication on (the workflow: test_workflow.py)."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path


def test_jobs_api_refuses_requests_without_the_token(ray_cluster):
    req = urllib.request.Request(f"{ray_cluster['dashboard']}/api/jobs/")
    try:
        urllib.request.urlopen(req, timeout=10)
        status = 200
    except urllib.error.HTTPError as e:
        status = e.code
    assert status == 401
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    req.add_header("Authorization", f"Bearer {token}")
    assert urllib.request.urlopen(req, timeout=10).status == 200
