"""Serving role-play characters behind an OpenAI-compatible API on Ray Serve.

``rp_ray.serve.app:build_app`` is the application (``serve run serve_configs/<name>.yaml``): one deployment whose
replica holds the HTTP routes (``app``: thin routes, API key in ``auth``) and a vLLM engine in-process (``engine``).
Each endpoint has its types and serving logic in a module of its own (``chat``, ``completion``, ``tokenization``),
sharing the wire types in ``protocol`` and the replica's state in ``serving`` (``endpoints`` joins them); the
deployment options are in ``deployments``. The characters a request can name are ``rp_ray.character``; replies are
cleaned by ``rp_ray.llm.reply``.
"""
