"""The other strategies of the trainer (DESIGN.md section 4): loss and model components.

- skd: self-knowledge distillation with mAP@k coefficients (Carrino et al. 2023).
- xsta: X-STA, sharing, teaching and aligning (Cao et al. 2023).

Each module holds the paper's formulas in plain PyTorch; where the paper and its public code
differ, the paper is the default and the code's behaviour an option, both documented.
"""
