"""bench/hostile_load.py on the session's app, short: 4 chat clients for 15 s alone, then 15 s beside the attacker
(ReDoS lorebook card, macro-bomb cards, PNG bombs, 5,000-deep JSON, cross-origin text/plain posts). The replica must
not restart, ``/health`` must answer 200 at every poll, every attack must get a 4xx or a bounded 2xx within 10 s, and
the clients' p99 with the attacker must stay within 3x of their p99 without: a generous bound, since the suite runs
beside other CPU-heavy processes; the bench itself (16 clients, 60 s phases) checks 2x."""

from __future__ import annotations

import sys

import pytest
from conftest import KEY, REPO

sys.path.insert(0, str(REPO / "bench"))
import hostile_load  # noqa: E402 -- a bench module, imported by path

pytestmark = pytest.mark.slow  # ~45 s of load on the real Serve app


def test_the_app_holds_under_hostile_load(app):
    target = hostile_load.Target(app.url, KEY, app.registry, ("base", "a1"))
    report = hostile_load.run(target, seconds=15, clients=4)
    print(report.table())
    assert {c.attack for c in report.attacked.attacks} == set(hostile_load.ATTACKS)
    fails = report.verdict(p99_factor=3.0)
    assert not fails, report.table() + "\n" + "\n".join(fails)
    assert not list(app.registry.glob("hostile-*")), "the attacker's cards were left in the registry"
