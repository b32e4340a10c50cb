"""The commands beside the pipeline: studies, benchmarks, the CI gate, predict."""
