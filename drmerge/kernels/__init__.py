"""Torch building blocks the merge methods share: the top-k trim (``topk``), sign election
and the combine step (``signs``), the joint decomposition (``decompose``), low-rank algebra
(``lowrank``) and the chunked element-wise executor (``elementwise``). ``rules`` is the
torch-free description of an element-wise rule. Nothing here knows a method by name.
"""
