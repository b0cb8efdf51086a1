"""Serving role-play characters behind an OpenAI-compatible API (Ray Serve).

This package so far holds the wire protocol, request limits, character cards and
adapter-folder resolution; the Ray Serve deployments are not written yet (issue 5).
"""
