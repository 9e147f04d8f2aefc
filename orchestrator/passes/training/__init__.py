"""Training passes: LoRA / QLoRA fine-tuning (`lora/`) and folding an adapter into its base (`merge`)."""
