"""SmolLM2-135M-Instruct, the real default model, and an EAGLE-3 draft head distilled from it on this machine."""
