"""Where the tests find the paper's examples: ``shared/paper-examples`` beside the repository, or
``$AMODAL_EXAMPLES``."""
import os
from pathlib import Path

EXAMPLES = Path(os.environ.get("AMODAL_EXAMPLES") or Path(__file__).resolve().parents[2] / "shared" / "paper-examples")
