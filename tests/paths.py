"""Where the tests find the paper's examples and code: ``shared/`` beside the repository, or
``$AMODAL_EXAMPLES``."""
import os
from pathlib import Path

EXAMPLES = Path(os.environ.get("AMODAL_EXAMPLES") or Path(__file__).resolve().parents[2] / "shared" / "paper-examples")
# The paper's own code (the judge of the method), beside the repository or at ``$AMODAL_REFERENCE``.
REFERENCE = Path(os.environ.get("AMODAL_REFERENCE")
                 or Path(__file__).resolve().parents[2] / "shared" / "reference" / "saraao-amodal")
