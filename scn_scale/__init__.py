"""Self-Cure Network facial-expression recognition: the method core, data pipeline and distributed training."""
