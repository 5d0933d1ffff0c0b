"""Adapting a source network to the target domain: new head, BatchNorm re-estimation (AdaBN)."""
