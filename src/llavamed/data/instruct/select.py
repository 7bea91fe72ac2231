"""Which figures to ask about, in which order: round-robin across domains so that a capped run
(``--max-samples``) stays balanced, exactly as the paper's generator cycled its domain lists."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from llavamed.data.figures import DOMAINS, primary_domain


def round_robin(records: Iterable[dict], max_samples: int | None = None) -> tuple[list[dict], int]:
    """Interleave records by primary domain (judge order, then ``other``), keeping each domain's
    input order. Returns (selected records, number of duplicate pair_ids skipped): LLaVA-Med's
    caption JSON can file one figure under several domains."""
    groups: OrderedDict[str, list[dict]] = OrderedDict((d, []) for d in (*DOMAINS, "other"))
    seen: set[str] = set()
    dups = 0
    for rec in records:
        pid = str(rec.get("pair_id", ""))
        if pid in seen:
            dups += 1
            continue
        seen.add(pid)
        groups[primary_domain(rec.get("domain"))].append(rec)
    lists = [g for g in groups.values() if g]
    out: list[dict] = []
    i = 0
    while lists and (max_samples is None or len(out) < max_samples):
        progressed = False
        for g in lists:
            if i < len(g):
                out.append(g[i])
                progressed = True
                if max_samples is not None and len(out) >= max_samples:
                    break
        if not progressed:
            break
        i += 1
    return out, dups
