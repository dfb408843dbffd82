"""dist_xqa: cross-lingual extractive QA by language-branch knowledge distillation."""
