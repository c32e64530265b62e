"""``amodal status``: counts per state with progress bars, failures listed, optional wait."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from amodal.state import OUTCOMES
from producer.client import PENDING, Client

STATES = (*OUTCOMES, PENDING)


def show_status(client: Client, dataset: str, wait: bool, interval: float = 2.0) -> dict[str, int]:
    """Print one bar per state; with ``wait``, refresh until no row is pending."""
    counts = client.status(dataset)
    bars = {s: tqdm(total=counts["total"], desc=f"{s:>10}", unit="row", file=sys.stderr, leave=True)
            for s in STATES}
    try:
        while True:
            for state, bar in bars.items():
                bar.n = counts[state]
                bar.refresh()
            if not wait or counts[PENDING] == 0:
                break
            time.sleep(interval)
            counts = client.status(dataset)
    finally:
        for bar in bars.values():
            bar.close()
    if counts["failed"]:
        print("failed:", file=sys.stderr)
        for line in client.manifest(dataset):
            if line["status"] == "failed":
                print(f"  line {line['line']}: {line['image']} {line['query']!r}: {line['message']}", file=sys.stderr)
    return counts
