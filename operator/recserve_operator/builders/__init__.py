"""Pure builders: one module per owned kind, each a deterministic build_<kind>(spec, ids) -> dict."""
