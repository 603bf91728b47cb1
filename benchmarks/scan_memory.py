"""Peak memory of key-kernel scans of growing token counts (must not grow with N).

Each N runs in a fresh process that streams prompt shards through the scan and reports
its peak resident set size.

    .venv/bin/python -m benchmarks.scan_memory
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

from benchmarks.common import record

MODEL = "random:pythia-410m?layers=2&hidden=128&heads=4&vocab=512"
TOKENS = (62_500, 250_000, 1_000_000)
PROMPT = ("The committee studied the ancient map before the storm arrived, and then the research team "
          "described the harbour lights with remarkable patience. ") * 3  # ~500 byte tokens


def child(n_tokens: int) -> None:
    """Scan about ``n_tokens`` tokens, shard by shard, and print peak RSS as JSON."""
    from spectral.loading import load_model
    from spectral.scan import ScanSettings, ScanUnit, finalize, scan_unit

    loaded = load_model(MODEL)
    settings = ScanSettings(batch_size=16, max_tokens=500)
    per_prompt = min(500, len(PROMPT.encode()))
    n_prompts = -(-n_tokens // per_prompt)
    start = time.perf_counter()
    total, shard = None, 64
    for i, first in enumerate(range(0, n_prompts, shard)):  # prompts are generated per shard, never all at once
        unit = ScanUnit(i, (PROMPT,) * min(shard, n_prompts - first), settings)
        part = scan_unit(loaded, unit)
        total = part if total is None else total + part
    result = finalize(total, settings)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": int(result.n_tokens[0, 0]), "peak_rss_mb": round(peak_mb, 1),
                      "seconds": round(seconds, 1), "tokens_per_s": round(result.n_tokens[0, 0] / seconds)}))


def main() -> None:
    rows = []
    for n in TOKENS:
        out = subprocess.run([sys.executable, "-m", "benchmarks.scan_memory", "--child", str(n)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    record("scan_memory", {"model": MODEL, "rows": rows})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
    else:
        main()
