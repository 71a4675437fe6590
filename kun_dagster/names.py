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
