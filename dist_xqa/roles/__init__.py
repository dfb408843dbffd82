"""The code each role of the one torch.distributed world runs: phase 1's supervised
training (teachers, baselines), phase 2's producers and student (LBMRC), X-STA and SKD.
Which ranks play which role is the role plan (dist_xqa.plan)."""
