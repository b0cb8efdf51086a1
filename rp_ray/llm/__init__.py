"""The LLM layer training, evaluation and serving share: chat templates, reply cleaning, model and tokenizer
loading, the vLLM engine settings, the CPU LoRA kernels, checkpoints, the model hub and the tiny demo models."""
