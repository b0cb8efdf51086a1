"""Characters the way role-play users bring them, and the characters a served app knows. Pure Python (no Ray, no
engine); ``rp_ray.serve`` imports this package, never the reverse.

- ``names``: the one rule for the names a request's ``model`` can be.
- ``card``: Character Card V1/V2/V3 (JSON or PNG), rp_ray's settings inside a card (``data.extensions["rp_ray"]``),
  the file registry of imported cards.
- ``png``: PNG text chunks (stdlib only).
- ``keys``: lorebook keys matched as SillyTavern matches them (regexes on RE2), their limits, entry decorators.
- ``lorebook``: which entries a chat brings in (``activate``), standalone lorebook files.
- ``prompt``: a card's system prompt and turns, the typed ``Prompt`` a chat request is built from.
- ``scenes``: ChatHaruhi scene corpora and BM25 retrieval.
- ``catalog``: the characters a served app knows (characters_file entries and imported cards, with their lorebooks
  and scene memory), checked where the serve config is read and rescanned in each replica.
"""
