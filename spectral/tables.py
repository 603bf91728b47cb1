"""The schema of every Parquet table eigengap writes, checked when written and when read.

(Being filled in: the lead declares the job tables' names here; their exact columns follow.)
"""

from __future__ import annotations

import pyarrow as pa

SCAN = pa.schema([])
PATCH = pa.schema([])
PATCH_EXAMPLES = pa.schema([])
VALIDATE = pa.schema([])
VALIDATE_HEADS = pa.schema([])
STEER_STRATEGIES = pa.schema([])
STEER_LAYERS = pa.schema([])
STEER_GRID = pa.schema([])
STEER_PER_PROMPT = pa.schema([])
STEER_VERDICTS = pa.schema([])
