"""Opt-in feedback loop: PII scrubbing (`pii`), the on-disk labelling queue (`store`), the service
hook (`hook`, needs BentoML) and the torch-free CLI (`python -m serving.feedback`). See docs/privacy.md."""
