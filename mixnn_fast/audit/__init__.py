"""The label audit: which given labels are wrong, and how well a ranking finds them.

Needs no trainer::

    from mixnn_fast.audit import find_label_issues
    issues = find_label_issues(labels, probabilities)   # (N,) int, (N, C) out-of-sample or soft targets
    issues.issue_indices[:20]                           # the flagged samples, most likely wrong first

:mod:`~mixnn_fast.audit.reference` is cleanlab's audit on cross-validated logistic regression
(the comparison), :mod:`~mixnn_fast.audit.run_folder` the audit of a training run's folder.
:mod:`~mixnn_fast.audit.noise_transition` estimates a model's clean accuracy from noisy held-out
labels (the noise's transition matrix from anchors, then backward correction), which agreement
with noisy labels misjudges under class-pair noise.
"""
from mixnn_fast.audit.issues import RULES, LabelIssues, find_label_issues, issues_from_scores, read_issues_csv
from mixnn_fast.audit.noise_transition import (anchor_transition, noise_corrected_accuracy,
                                               noise_corrected_log_likelihood)
from mixnn_fast.audit.scores import auroc, evaluate_issues

__all__ = ["RULES", "LabelIssues", "anchor_transition", "auroc", "evaluate_issues", "find_label_issues",
           "issues_from_scores", "noise_corrected_accuracy", "noise_corrected_log_likelihood", "read_issues_csv"]
