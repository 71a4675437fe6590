"""The dataset versions' asset names, in graph order: versions.py (the registry) holds everything
else about each; the names live here so that the modules the registry imports can use them too."""

RAW, FILTERED, LABELED, SCORED, POLISHED, DATASET = (
    "raw_corpus",
    "filtered_corpus",
    "labeled_pairs",
    "scored_pairs",
    "polished_pairs",
    "instruction_dataset",
)
