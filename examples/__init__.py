"""Example pipelines for offload, in the seed Task Interface format."""
