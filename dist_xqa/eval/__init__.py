"""Evaluation, one package: span decoding (`decode.postprocess`), EM/F1 as the official
scripts compute them (`metrics`), per-language reports with XLT, G-XLT and the matrix
(`report.score`), reading gold files (`gold`), the command line that scores a prediction
file (`cli`, run as `python -m dist_xqa.eval`) and the evaluate stage that scores a run's
models on its test sets (`stage`)."""
