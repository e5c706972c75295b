"""What `corinfomax eval` measures, as plain constants (no PyTorch): the report format, the kNN vote and the
linear-probe recipes.

Both the evaluation (training/evaluate.py) and its command line (training/eval_cli.py) read them from here; the
command line cannot import evaluate.py at parser-build time (it imports PyTorch), and the evaluation must not
import its command line.
"""

from __future__ import annotations

from typing import Any

REPORT_FORMAT = "corinfomax-eval/1"
LINEAR_MODES = ("fast", "paper", "none")
KNN_K = 200
# Temperature of the eval kNN vote: 0.1, the value every accuracy in docs/RESULTS.md and in the default model's
# card was measured with; changing it would make new reports incomparable. (The service's /classify votes at
# 0.07 for its confidences; the two never meet.)
KNN_TEMPERATURE = 0.1
PAPER_PROBE: dict[str, Any] = dict(lr=0.2, momentum=0.9, weight_decay=0.0, epochs=100, batch_size=256,
                                   schedule="cosine")
FAST_PROBE: dict[str, Any] = dict(optimizer="lbfgs", max_iter=200, weight_decay=1e-4)
