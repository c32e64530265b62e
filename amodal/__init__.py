"""amodal: open-world amodal appearance completion (Ao et al., CVPR 2025), importable with no broker."""
from amodal.settings import Settings

__all__ = ["Settings"]
__version__ = "0.1.0"
