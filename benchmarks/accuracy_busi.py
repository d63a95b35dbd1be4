"""BUSI breast-lesion accuracy: 5-fold group-aware CV (dup_group kept inside one fold).

    python benchmarks/accuracy_busi.py [--budget-minutes TOTAL] [--preset default|seed|large]

Out-of-fold Dice on lesion images (the papers' convention), Dice over all images with the stated
empty rule, false-positive images among the normal scans, HD95, wall time and hardware; the same
machinery as benchmarks/accuracy.py, which this calls with --dataset busi.
"""

import sys

from accuracy import main

if __name__ == "__main__":
    main(["--dataset", "busi", *sys.argv[1:]])
