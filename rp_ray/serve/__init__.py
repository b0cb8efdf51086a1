"""Serving role-play characters behind an OpenAI-compatible API on Ray Serve.

``rp_ray.serve.app:build_app`` is the application (``serve run serve_configs/<name>.yaml``): an HTTP ingress
(``app``: thin routes, auth) in front of a vLLM engine deployment (``engine``). The chat logic (prompt building,
limits, sampling, responses and streams) is in ``serving``, the wire types in ``protocol``, the deployment options
in ``deployments``, character cards in ``characters``, the API key in ``auth``; replies are cleaned by
``rp_ray.llm.reply``.
"""
