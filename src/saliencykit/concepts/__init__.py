"""Concept explanations (the roadmap's step after datasets): concept banks (CRAFT, ACE), concept
importance, CRP, prototypes, counterfactuals, feature visualisation and class summaries. Empty
until that work lands; it may import the core, methods, metrics, tasks and datasets."""
