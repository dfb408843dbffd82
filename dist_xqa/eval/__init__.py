"""Evaluation: span decoding (`decode`), EM/F1 as the official scripts compute them
(`metrics`), per-language reports (`report`) and reading gold files (`gold`). The command
line and the public names are in `dist_xqa.evaluate`."""
