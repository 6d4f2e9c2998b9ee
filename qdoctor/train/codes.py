"""Finding codes that `qdoctor train` emits (area "plan"), for the generated rule reference."""

CODES = {
    "QD801": ("plan-exceeds-memory", "warning",
              "The peak-memory estimate for the plan exceeds the memory usable on the device; the run "
              "still starts, and halves the micro-batch on out-of-memory."),
    "QD802": ("loss-not-finite", "error",
              "The loss became NaN or inf: the run stops with the step, dtype and learning rate, and a fix "
              "(lower the learning rate; bf16 instead of fp16 where the GPU has it)."),
    "QD803": ("oom-at-micro-batch-1", "error",
              "Out of memory even after halving the micro-batch down to 1 (each halving doubles the "
              "accumulation, keeping the effective batch): turn on gradient checkpointing (on a GPU where "
              "it is on already: keep each layer's input in host memory, `offload`), shorten sequences, or "
              "use the CPU-held optimizer."),
    "QD804": ("gradient-not-finite", "error",
              "The gradient norm was NaN or inf: each such step is skipped (nothing applied; counted in the "
              "summary and marked in metrics.jsonl), and a few in a row stop the run. A checkpoint is never "
              "written from non-finite weights, so the last one can be resumed with a lower learning rate."),
}
