"""Merge-quality benchmark: real fine-tunes of one encoder on six tasks, merged by drmerge."""
