"""qdoctor: can this machine fine-tune an LLM with QLoRA? Observe, judge, prove, then train."""

__version__ = "0.1.0"
