"""Judging models downstream: the paper's few-shot tasks from a registry package, scored with causal routing."""
