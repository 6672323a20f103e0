"""Fine-tuning: TRL SFT/DPO scripts, PEFT LoRA on experts, data collators and the routing callback."""
