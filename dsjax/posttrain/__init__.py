"""Post-training: instruction data, the chat template, SFT, GRPO rewards and loss, evaluation."""
