import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train_net.py and tools/ live at the repository root; the package is imported from this checkout
# (ahead of the editable install, so a git worktree tests its own code).
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "projects", "DEQDet"))
