import json

from .conftest import REPO


def texts() -> list[str]:
    seeds = [json.loads(line) for line in (REPO / "demo/seed/coig_cqia_seed.jsonl").read_text().splitlines()]
    return [s["instruction"] for s in seeds] + [s["output"] for s in seeds]
