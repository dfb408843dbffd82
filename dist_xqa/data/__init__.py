"""Data pipeline: SQuAD-format loading and validation, parallel sets, dataset builders,
splits, features, the demo corpus and answer recovery for translated data."""
