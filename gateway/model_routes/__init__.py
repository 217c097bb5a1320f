"""Model routes: public model names resolved to served model versions (weighted, sticky, shadowed, with fallbacks)."""
