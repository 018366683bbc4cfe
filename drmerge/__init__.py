"""drmerge: merge fine-tuned models into one multitask model with DRM (Decom-Renorm-Merge).

``drmerge.merge(spec)`` runs a merge from a spec mapping (docs/DESIGN.md, "The spec") or a
parsed ``MergeSpec``; failures raise ``MergeError`` carrying a stable ``code``.
"""

from __future__ import annotations

from .errors import MergeError
from .spec import MergeSpec, parse_spec
from .version import __version__


def merge(spec, **kwargs):
    """Run a merge. ``spec``: a mapping or a ``MergeSpec``; ``kwargs`` go to ``run_merge``
    (``device``, ``progress``, ``should_cancel``, ``s3_options``)."""
    from .pipeline import run_merge  # torch is only imported when merging

    if not isinstance(spec, MergeSpec):
        spec = parse_spec(spec)
    return run_merge(spec, **kwargs)


__all__ = ["merge", "MergeError", "MergeSpec", "parse_spec", "__version__"]
