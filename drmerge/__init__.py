"""drmerge: merge fine-tuned models into one multitask model with DRM (Decom-Renorm-Merge).

``drmerge.merge(spec)`` runs a merge from a spec mapping (DESIGN.md s.4) or a parsed
``MergeSpec``; failures raise ``MergeError`` carrying a stable ``code``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import MergeError  # noqa: E402
from .spec import MergeSpec, parse_spec  # noqa: E402


def merge(spec, **kwargs):
    """Run a merge. ``spec``: a mapping or a ``MergeSpec``; ``kwargs`` go to ``run_merge``
    (``device``, ``progress``, ``should_cancel``, ``s3_options``)."""
    from .pipeline import run_merge  # torch is only imported when merging

    if not isinstance(spec, MergeSpec):
        spec = parse_spec(spec)
    return run_merge(spec, **kwargs)


__all__ = ["merge", "MergeError", "MergeSpec", "parse_spec", "__version__"]
