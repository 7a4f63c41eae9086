"""Checkpoint import/export: CLIP teachers (HF, OpenAI, open_clip) and EVA encoders (timm, official)."""
