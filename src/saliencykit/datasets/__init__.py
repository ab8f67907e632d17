"""Dataset-scale runs (the next step of the roadmap): image sources (folders, CSV/JSONL lists,
torchvision and Hugging Face datasets, the parts dataset), resumable runs to Parquet tables and
stored maps, locally or on Ray, and their summaries. Empty until that work lands; it may import
the core, methods, metrics and tasks, and present/cli build on it."""
