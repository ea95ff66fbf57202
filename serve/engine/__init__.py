"""The reranker engine one arm replica runs: prompt building, vision features, scoring."""
