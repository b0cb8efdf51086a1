"""Serving role-play characters behind an OpenAI-compatible API on Ray Serve.

``rp_ray.serve.app:build_app`` is the application (``serve run serve_configs/<name>.yaml``): an HTTP ingress
(``app``: routes, auth, limits, streaming) in front of a vLLM engine deployment (``engine``); the wire types are in
``protocol``, character cards in ``characters``, the API key in ``auth``, streamed-reply cleaning in ``reply``.
"""
