"""bgq's Celery workers: one ONNX session per pool process, results written to the store."""

import os

# pymatting (alpha matting) runs numba code at import, which starts GNU OpenMP in the parent;
# numba then kills any forked pool process that uses it. The workqueue layer is fork-safe and
# gives bit-identical results. Must be set before numba is imported.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
