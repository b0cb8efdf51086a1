"""Serving role-play characters behind an OpenAI-compatible API on Ray Serve.

``rp_ray.serve.app:build_app`` is the application (``serve run serve_configs/<name>.yaml``): one deployment whose
replica holds the HTTP routes (``app``: thin routes, API key in ``auth``) and a vLLM engine in-process (``engine``).
The serving logic is ``serving`` (the replica's state, tokenize), ``completion`` over it and ``chat`` over that
(``chat.ChatServing``: every endpoint), with the wire types they share in ``protocol``; adapters loaded at run time
are in ``adapters``, the Prometheus metrics in ``metrics``, the deployment options in ``deployments``. The characters
a request can name are ``rp_ray.character``; replies are cleaned by ``rp_ray.llm.reply``.
"""
