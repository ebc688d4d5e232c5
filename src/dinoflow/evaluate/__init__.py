"""Evaluation stages: embeddings (`embed`), neighbour search (`neighbours`), text embeddings (`text`),
image-text alignment (`align`, with the exact / sampled all-pairs Spearman in `spearman`) and probes (`probes`).
`vectors` holds the one Parquet reader / writer of embedding files (`read_vectors`, re-exported as
`embed.read_embeddings`)."""
