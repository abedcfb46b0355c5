"""The merge of the two branches, RMSNorm_swa + RMSNorm_rla: reference and the whole layer (naive.py), Triton
(triton.py)."""
