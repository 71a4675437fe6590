"""The dataset versions' asset names, in graph order: versions.py (the registry) holds everything
else about each; the names live here so that the modules the registry imports can use them too."""

RAW, FILTERED, DEDUPED, LABELED, SCORED, POLISHED, DATASET = (
    "raw_corpus",
    "filtered_corpus",
    "deduped_corpus",
    "labeled_pairs",
    "scored_pairs",
    "polished_pairs",
    "instruction_dataset",
)

# The dedup indices (dedup.py): a MinHash signature per document, and the clusters over a whole
# source that deduped_corpus drops by. They hold data but are not dataset versions (no funnel row).
SIGNATURES, CLUSTERS = "minhash_signatures", "duplicate_clusters"

# The source corpora's files, observed per source x shard (automation/sources.py): raw_corpus's input.
SOURCE_FILES = "source_files"

# Humpback's rounds (config `iterations`): round 1 is the graph above; round k >= 2 re-trains the
# chat model on the seeds + round k-1's release and re-scores the same labeled_pairs, so these
# stages exist once per round, named <stage>_round<k> (docs/ARCHITECTURE.md: why not a dimension).
CHAT_MODEL, EVALUATION = "chat_model", "evaluation"
ROUND_STAGES = (CHAT_MODEL, SCORED, POLISHED, DATASET, EVALUATION)
_ROUND = "_round"


def in_round(stage: str, k: int) -> str:
    """The asset name of a per-round stage in round k (round 1 keeps the plain name)."""
    if stage not in ROUND_STAGES:
        raise ValueError(f"{stage} is not a per-round stage ({', '.join(ROUND_STAGES)})")
    return stage if k == 1 else f"{stage}{_ROUND}{k}"


def split_round(asset: str) -> tuple[str, int]:
    """(stage, round) of an asset name: scored_pairs_round2 -> (scored_pairs, 2); others round 1."""
    stage, sep, k = asset.rpartition(_ROUND)
    if sep and k.isdigit() and stage in ROUND_STAGES and int(k) >= 2:
        return stage, int(k)
    return asset, 1


def stage_of(asset: str) -> str:
    return split_round(asset)[0]
